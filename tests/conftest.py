import os

import torch

# Two cores: more threads than cores makes small ops much slower.
torch.set_num_threads(1)

# Without a GPU the compact layer's Triton kernels run in Triton's interpreter (set before Triton is
# imported: it decides at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
