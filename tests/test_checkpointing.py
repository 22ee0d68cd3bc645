"""Checkpoints (`l2p_jax.checkpointing`): the config check of a resume, the resume
policy itself, and the skipping of a damaged checkpoint. The resume of a whole training
run is in test_train.py; a model restored for evaluation in test_eval.py."""

import gc
import json
import logging

import chex
import jax.numpy as jnp
import pytest
from test_reliability import save_checkpoints

from configs import cifar as cifar_configs
from l2p_jax import checkpointing
from l2p_jax.checkpointing import resume

get_config = cifar_configs.get_config


def test_a_field_newer_than_the_checkpoint_is_reported_not_refused():
  """A checkpoint written before model.bnn_batchnorm existed resumes (the field's
  default is the old behaviour); a changed model field it does have is refused."""
  config = get_config('adv_bnn,resnet8,cifar10,tiny')
  saved = config.to_dict()
  del saved['model']['bnn_batchnorm']
  notes = checkpointing.check_compatible(saved, config, 'ckpt')
  assert notes == ["model.bnn_batchnorm: checkpoint has '<absent>', config has False"]
  config.model.width = 1.0
  with pytest.raises(
    checkpointing.CheckpointMismatchError, match=r'model.width: checkpoint has 0.5, config has 1.0'
  ):
    checkpointing.check_compatible(saved, config, 'ckpt')


def test_resume_takes_the_newest_checkpoint_and_records_a_changed_config(tmp_path, caplog):
  """No checkpoint: the fresh tree and no step. One: its tree, its metadata as written,
  another learning rate said and kept in config.STEP.json; another batch size refused."""
  config = get_config('l2p,resnet8,cifar10,tiny')
  manager = checkpointing.Checkpoints(str(tmp_path / 'checkpoints'))
  fresh = {'step': jnp.zeros((), jnp.int32), 'w': jnp.zeros((4,))}
  assert resume.resume(manager, config, fresh, str(tmp_path)) == (fresh, None)
  meta = checkpointing.checkpoint_meta(config, 10, [0.5] * 3, [0.25] * 3, (32, 32, 3), devices=1)
  saved = {'step': jnp.asarray(5, jnp.int32), 'w': jnp.arange(4.0)}
  manager.save(5, saved, meta)
  manager.wait()
  assert manager.meta(5) == {**meta, 'config': json.loads(json.dumps(meta['config']))}
  assert meta['image_shape'] == [32, 32, 3]

  config.optim.learning_rate = 0.05
  tree, step = resume.resume(manager, config, fresh, str(tmp_path))
  assert step == 5
  chex.assert_trees_all_equal(tree, saved)
  assert tree['w'].sharding == fresh['w'].sharding
  assert 'optim.learning_rate: checkpoint has 0.1, config has 0.05' in caplog.text
  assert json.loads((tmp_path / 'config.5.json').read_text())['optim']['learning_rate'] == 0.05
  config.batch_size = 32
  for refuse in (resume.refuse_changed_steps, lambda m, c: resume.resume(m, c, fresh, '')):
    with pytest.raises(
      checkpointing.CheckpointMismatchError,
      match=r'(?s)batch_size: checkpoint has 64, config has 32.*--workdir',
    ):
      refuse(manager, config)
  manager.close()


def test_a_damaged_checkpoint_is_one_warning_and_no_orbax_tracebacks(tmp_path, caplog):
  save_checkpoints(tmp_path, (4, 8))
  (tmp_path / '8' / 'state' / 'manifest.ocdbt').unlink()
  manager = checkpointing.Checkpoints(str(tmp_path), read_only=True)
  with caplog.at_level(logging.DEBUG):
    step, *_ = manager.restore_newest_readable()
    gc.collect()  # Unretrieved task errors are logged when the tasks are freed.
  manager.close()
  assert step == 4
  noisy = [r for r in caplog.records if r.name == 'asyncio' or r.levelno >= logging.ERROR]
  assert not noisy, [r.getMessage()[:200] for r in noisy]
  warnings = [r.getMessage() for r in caplog.records if 'is unreadable' in r.getMessage()]
  assert len(warnings) == 1 and 'tensorstore_spec' not in warnings[0], warnings
