r"""Evaluation of trained checkpoints under the paper's attacks (eval.py's config).

The model, dataset and split come from the checkpoint; this config holds the attacks
and how a randomized model's prediction is made. `get_config('')` is the full
evaluation, `get_config('tiny')` a CPU smoke test of every attack:

  python eval.py --workdir runs/l2p_r20
  python eval.py --workdir runs/l2p_r20,runs/pni_r20,runs/vanilla_r20 \
      --config.attacks=clean,fgsm,pgd,eps_sweep,transfer
  python eval.py --workdir runs/l2p_r20 --config.attacks=apgd --config.apgd.eot_draws=50
  python eval.py --workdir runs/adv_bnn_r20 --config.predict.rule=single
  python eval.py --workdir /tmp/tiny --config configs/eval.py:tiny

Attack names (config.attacks, comma-separated): clean; fgsm; pgd (pgd.steps steps),
pgd<N> (N steps: pgd20, pgd100); eot_pgd, eot_pgd<N> (PGD with gradients averaged
over eot.draws noise draws); eps_sweep (FGSM and PGD at every eps_sweep.eps_255/255,
PGD with eps_sweep.steps steps of eps_sweep.step_fraction * eps); cw (C&W L2 with
cw.*); cw_pni (C&W L2 with PNI's settings whatever cw.* says: the authors' column);
apgd (AutoAttack 'rand': APGD-CE + APGD-DLR with EOT); apgd_t (AutoAttack's APGD-T,
targeted DLR towards apgd_t.target_classes classes); autoattack (the standard suite
APGD-CE, APGD-T, Square on deterministic models, 'rand' on randomized ones); square
(Square, gradient-free, square.* queries); noise_off_pgd, noise_off_pgd<N>,
noise_off_apgd (PGD / APGD made on the checkpoint with its noise off, the mean network,
and judged with it on: an adaptive attack on noise defenses, run on randomized models
only); few_pixel (every
few_pixel.pixels), few_pixel<N> (N pixels); transfer (FGSM and PGD examples of every
transfer source judged by every transfer target).
"""

from l2p_jax.evaluation.eval_config import get_config

__all__ = ['get_config']
