import torch

# Two cores: more threads than cores makes small ops much slower.
torch.set_num_threads(1)
