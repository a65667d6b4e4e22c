"""Drop-in modules whose forward runs pyops ops; each subclasses the torch.nn module it replaces, so constructor,
parameters, state_dict and repr are the same."""
import torch
import torch.nn.functional as F

from .conv1d import conv1d


class Conv1d(torch.nn.Conv1d):
    """torch.nn.Conv1d computed by pyops.conv1d (forward and backward).

    Same constructor and state_dict as torch.nn.Conv1d. padding_mode 'zeros' passes the padding to the kernel;
    'reflect', 'replicate' and 'circular' pad with F.pad first, as nn.Conv1d does.
    Input (N, C_in, L) or (C_in, L); output (N, C_out, L_out) or (C_out, L_out).
    """

    def forward(self, x):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
