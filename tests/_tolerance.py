"""The accuracy rule of every low-precision kernel test (flash-attention's): a kernel's error
against an fp64 reference is at most twice the error of PyTorch's own run in the same low
precision, plus a small slack for results PyTorch happens to get exact."""
import torch


def max_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest absolute difference, in float64; 0 for empty tensors."""
    return (got.double() - exact.double()).abs().max().item() if got.numel() else 0.0


def allowed_error(torch_error: float, slack: float) -> float:
    """What a kernel may be off by where PyTorch's own low-precision run is off by
    ``torch_error``."""
    return 2 * torch_error + slack


def assert_within_twice_torch(name: str, got: torch.Tensor, exact: torch.Tensor,
                              torch_run: torch.Tensor, slack: float) -> None:
    err = max_error(got, exact)
    allowed = allowed_error(max_error(torch_run, exact), slack)
    assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} (2x PyTorch's)"
