"""The PyTorch parity harness: the authors' networks (`torch_reference`), their training
step (`torch_step`) and training trajectories compared with ours (`trajectory`).
Needs the `torch` extra."""
