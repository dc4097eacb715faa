"""CPU runtime: run the real Megatron-Core 0.16.1 on gloo ranks without CUDA.

Megatron-Core assumes a CUDA device in a bounded set of places. Rather than
editing Megatron files, :func:`enable` changes those places from the outside,
and only when ``torch.cuda.is_available()`` is false, so a GPU run is never
touched. Each piece below says which Megatron-Core behaviour needs it:

* ``torch.cuda.current_device()`` places tensors (``RotaryEmbedding.__init__``,
  attention masks, ``p2p_communication``): it returns the CPU device.
* Literal ``device="cuda"`` (``schedules.forward_backward_pipelining_*`` build
  ``total_num_tokens`` so, ``clip_grads``, ``grad_scaler``) and ``.cuda()``
  calls: a :class:`torch.overrides.TorchFunctionMode` rewrites CUDA device
  arguments to CPU and makes ``Tensor.cuda`` return the tensor itself.
* ``DistributedOptimizer._build_model_and_main_param_groups`` and
  ``clip_grads.clip_grad_by_total_norm_fp32`` assert ``tensor.type()`` is a
  ``torch.cuda.*Tensor`` string: the same mode reports CPU tensors so.
* ``tensor_parallel.random`` keeps named CUDA RNG states for TP-sharded init
  and dropout: they map to the CPU generator. ``CudaRNGStatesTracker.fork``
  then warns that the CPU RNG changed inside the fork, which is now expected,
  so that one warning is filtered.
* ``torch.cuda.synchronize`` / ``empty_cache`` and streams and events used by
  DDP and the MoE all-to-all dispatcher become no-ops.
* Mixture-of-Experts (:func:`_patch_megatron_moe`): the router's GEMM names
  Transformer Engine's ``te_general_gemm`` unguarded; the all-to-all dispatcher
  hands gloo tensor split sizes; the aux-loss tracker averages with
  ``ReduceOp.AVG``, which gloo lacks.

Call :func:`enable` once per process before building any Megatron object;
call ``model_parallel_cuda_manual_seed`` after ``initialize_model_parallel``
as on GPU (the tracker's named states must exist before dropout forks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import warnings

import torch
from torch.overrides import TorchFunctionMode

from megatron_patches.errors import ConfigError

_CPU = torch.device("cpu")
_ACTIVE_MODE: TorchFunctionMode | None = None

# Tensor.type() strings that Megatron-Core's fp32/fp16 asserts expect.
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _is_cuda_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int means "cuda:<int>" to torch's factories and Tensor.to.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU; ``.cuda()`` returns the tensor."""

    # Every torch call on CPU passes through here, so the common case (no device argument, none of
    # the three special functions) is kept to two cheap checks.
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        elif "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func in _SPECIAL:
            if func in _BACKWARD:
                return _backward_inside(self, func, args, kwargs)
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                name = func(*args)
                return _CUDA_TYPE_NAMES.get(name, name)
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


_BACKWARD = frozenset({torch.autograd.backward, torch.Tensor.backward})
_SPECIAL = frozenset({torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to, *_BACKWARD})
# Positional parameters after the first (the tensors) of each backward entry point.
_BACKWARD_PARAMS = {
    torch.autograd.backward: ("grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs"),
    torch.Tensor.backward: ("grad_tensors", "retain_graph", "create_graph", "inputs"),
}


def _backward_inside(mode: TorchFunctionMode, func, args: tuple, kwargs: dict) -> None:
    """Run a backward pass with ``mode`` active, as the forward pass ran.

    torch 2.13 hands ``torch.autograd.backward``/``Tensor.backward`` to the active torch-function
    mode, which is popped while its handler runs: calling ``func`` here would run the whole
    backward pass without the CUDA-to-CPU rewrites, and activation recompute (which re-runs
    forward code in backward, e.g. ``get_default_causal_mask(device="cuda")``) would fail. So
    the autograd engine is called directly, inside the mode, as ``torch.autograd.backward`` does.
    """
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    call = dict(zip(_BACKWARD_PARAMS[func], args[1:], strict=False), **kwargs)
    tensors = (args[0],) if isinstance(args[0], torch.Tensor) else tuple(args[0])
    grads = call.get("grad_tensors", call.get("gradient"))
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False)
    create_graph = bool(call.get("create_graph", False))
    retain_graph = call.get("retain_graph")
    inputs = call.get("inputs")
    inputs = () if inputs is None else ((inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs))
    with mode:
        _engine_run_backward(
            tensors,
            grads,
            create_graph if retain_graph is None else retain_graph,
            create_graph,
            inputs,
            allow_unreachable=True,
            accumulate_grad=True,
        )


class _NullStream:
    """Stands in for ``torch.cuda.Stream``/``Event``: every method is a no-op."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        # Chainable: MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize calls
        # ``stream.record_event()`` and later ``event.synchronize()``.
        return lambda *args, **kwargs: _NullStream()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class _FilterForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.device_count = lambda: 0
    cuda.Stream = _NullStream
    cuda.Event = _NullStream
    cuda.current_stream = lambda device=None: _NullStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU
    # generator directly, never through torch.manual_seed.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    from megatron_patches.compat import require_signature

    # Checked here rather than at import (the house rule): this module is imported before
    # Megatron-Core on purpose, so quiet_expected_warnings can run before Megatron's import warnings.
    require_signature(mp_random._get_cuda_rng_state, ["device", "clone", "graph_safe"])
    require_signature(mp_random._set_cuda_rng_state, ["new_state", "device", "graph_safe"])

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    logging.getLogger(mp_random.__name__).addFilter(_FilterForkWarning())


def _patch_megatron_moe() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    from megatron_patches.compat import require_signature

    require_signature(moe_utils.maybe_move_tensor_to_cpu, ["tensor", "as_numpy", "record_stream"])
    # moe_utils.RouterGatingLinearFunction.forward tests ``te_general_gemm is not None``, a name
    # that only exists when Transformer Engine imported (a NameError otherwise).
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    def split_sizes_on_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        # MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize: on a GPU the split sizes become
        # numpy arrays here; a CPU tensor came back unchanged, and gloo's all_to_all_single
        # wants int split sizes, not a tensor.
        if as_numpy and isinstance(tensor, torch.Tensor):
            return tensor.numpy()
        return tensor

    token_dispatcher.maybe_move_tensor_to_cpu = split_sizes_on_host
    _patch_all_reduce_average()


def _patch_megatron_mla() -> None:
    """Multi-Latent Attention without Transformer Engine: ``multi_latent_attention`` imports TE's layers from
    ``megatron.core.extensions.transformer_engine``, which imports without TE but holds mocks there, so
    its ``HAVE_TE`` is True and ``MultiLatentAttention.__init__``'s ``isinstance(.., TELinear)`` raises
    TypeError. With TE's layers absent, MLA's own fallback (``HAVE_TE = False``) is the truth."""
    from megatron.core.transformer import multi_latent_attention as mla

    names = ("TELinear", "TEColumnParallelLinear")
    if not all(hasattr(mla, name) for name in (*names, "HAVE_TE")):
        raise RuntimeError("megatron.core.transformer.multi_latent_attention changed: re-check the TE shim")
    if all(isinstance(getattr(mla, name), type) for name in names):
        return  # real Transformer Engine layers

    class NoTransformerEngine:  # matches no layer, so every isinstance check is False
        pass

    mla.HAVE_TE = False
    for name in names:
        setattr(mla, name, NoTransformerEngine)


def _patch_all_reduce_average() -> None:
    """``ReduceOp.AVG`` as a sum divided by the group size: gloo has no AVG, and Megatron-Core's
    ``moe_utils.reduce_aux_losses_tracker_across_ranks`` (the aux/z-loss logging) uses it."""
    import torch.distributed as dist

    from megatron_patches.compat import require_signature

    original = dist.all_reduce
    require_signature(original, ["tensor", "op", "group", "async_op"])

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if op != dist.ReduceOp.AVG or async_op:
            return original(tensor, op=op, group=group, async_op=async_op)
        original(tensor, op=dist.ReduceOp.SUM, group=group)
        tensor.div_(dist.get_world_size(group))
        return None

    dist.all_reduce = all_reduce


def quiet_expected_warnings() -> None:
    """Without CUDA, hide warnings that describe the design rather than a problem.

    Megatron-Core warns at import that Transformer Engine and apex are missing
    (optional GPU extras here), torch that gloo's collective names are
    deprecated, and fp32 ``zero_grad`` touches shard views. Call before
    importing Megatron-Core to keep a CPU run's output to what the user needs.
    A no-op on a GPU machine, where those are news.
    """
    if torch.cuda.is_available():
        return
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated")
    # fp32 (CPU) runs: DistributedOptimizer.zero_grad reads .grad of its shard views.
    warnings.filterwarnings("ignore", message=r"The .grad attribute of a Tensor that is not a leaf")
    # sequence parallel: a CUDA stream-scheduling hint, meaningless without CUDA.
    warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # torch deprecations that Megatron-Core 0.16.1's dist_checkpointing triggers on every load.
    warnings.filterwarnings(
        "ignore", category=FutureWarning, message=r".*(`load_state_dict` is deprecated|DTensor)"
    )


ALLOW_CPU_ENV = "ALLOW_CPU_TRAINING"  # =1: train on CPU although nvidia-smi lists GPUs (the test suite does)


def visible_gpus() -> int:
    """GPUs ``nvidia-smi -L`` lists (0 without nvidia-smi, or when it fails: no usable driver)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if listing.returncode != 0:
        return 0
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def refuse_hidden_gpus() -> None:
    """Stop with one line when torch sees no CUDA device on a machine whose ``nvidia-smi`` lists GPUs.

    That is a CPU torch wheel (or a CUDA build the driver cannot run) in the training interpreter:
    the CPU runtime would otherwise train on the CPU cores of a GPU node without a word.
    """
    if torch.cuda.is_available() or os.environ.get(ALLOW_CPU_ENV) == "1":
        return
    gpus = visible_gpus()
    if gpus:
        raise ConfigError(
            f"nvidia-smi lists {gpus} GPU(s) but torch {torch.__version__} in {sys.executable} sees no CUDA "
            f"device: install a CUDA build of torch there (or run with PYTHON=<a CUDA interpreter>), "
            f"or set {ALLOW_CPU_ENV}=1 to train on CPU on purpose"
        )


def is_enabled() -> bool:
    return _ACTIVE_MODE is not None


def enable() -> bool:
    """Activate the CPU runtime in this process if there is no CUDA device.

    Returns True when the CPU runtime is (now) active, False on a GPU machine,
    where nothing is changed. Safe to call more than once.
    """
    global _ACTIVE_MODE
    if _ACTIVE_MODE is not None:
        return True
    if torch.cuda.is_available():
        return False
    quiet_expected_warnings()
    _patch_torch_cuda()
    _patch_megatron_rng()
    _patch_megatron_moe()
    _patch_megatron_mla()
    _ACTIVE_MODE = CudaToCpuMode()
    _ACTIVE_MODE.__enter__()
    return True


def without_device_rewrites() -> contextlib.AbstractContextManager:
    """Torch calls inside run without the CUDA-to-CPU mode; a no-op context when it is off.

    For code that never names a CUDA device, such as ``torch.distributed``'s object
    collectives on gloo: ``all_gather_object`` makes ~30 small torch calls, and the mode's
    Python dispatch on each cost ~10% of it (~0.2 of ~2 ms between training steps on the
    2-core CI machine).
    """
    return torch._C.DisableTorchFunction() if _ACTIVE_MODE is not None else contextlib.nullcontext()


def device() -> torch.device:
    """The device a rank computes on: its CUDA device, or CPU when enabled."""
    return _CPU if is_enabled() else torch.device("cuda", torch.cuda.current_device())
