"""The PyTorch parity harness: the authors' networks (`torch_reference`), their training
step (`torch_step`), training trajectories compared with ours (`trajectory`) and the
report of how far they part (`trajectory_report`). Needs the `torch` extra."""
