"""Timing and memory of the benchmarked steps.

Every script measures its variants side by side in one process: warm-up steps, then ``repeats`` rounds in
which each variant runs once (the order alternates between rounds), and reports the median and the spread
(IQR and min/max) of each, the ratio of the medians and the min/max of the per-round (paired) ratios.

Memory is measured in a separate, untimed call of the same step:

- CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around the call (tensor bytes, not
  the allocator's reserved pool).
- CPU: the allocation / free events that ``torch.profiler.profile(profile_memory=True)`` records from
  PyTorch's CPU allocator, replayed in time order: the peak of live tensor bytes above the level at the
  start of the call. It counts tensor storage only (not Python objects, not the process RSS).

Both are "peak above start": the model weights, frozen backbones and optimizer state that exist before
the step are reported separately as static bytes (see ``module_bytes`` / ``optimizer_state_bytes``).
"""
import statistics
import time

import torch


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_interleaved(fns, repeats, warmup, device):
    """{name: [seconds]}: ``warmup`` untimed rounds, then ``repeats`` rounds, each variant once per round
    (order reversed every other round)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def summarize(values):
    """median, q1, q3 (IQR), min, max, n of a list of numbers."""
    values = sorted(values)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return dict(median=statistics.median(values), q1=q1, q3=q3, min=values[0], max=values[-1], n=len(values))


def ratio_summary(a, b):
    """Ratio of the medians of ``a`` and ``b``, the min/median/max of the per-round ratios a_i / b_i, and the
    ratio of the minima (on a CPU shared with other processes the fastest round is the least disturbed one)."""
    paired = [x / y for x, y in zip(a, b)]
    return dict(ratio=statistics.median(a) / statistics.median(b), paired_median=statistics.median(paired),
                paired_min=min(paired), paired_max=max(paired), min_ratio=min(a) / min(b))


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() - memory_allocated() around one untimed call (tensor bytes)",
    "cpu": "peak of live CPU tensor bytes above the start of one untimed call, replayed from the allocation events "
           "of torch.profiler.profile(profile_memory=True) (tensor storage only; not RSS)",
}


def peak_memory(fn, device, before=None):
    """Bytes: peak of allocated tensor memory during ``fn()`` above the level at its start.

    ``before`` runs first, outside the measurement: training steps pass ``optimizer.zero_grad(set_to_none=True)``
    so that the gradients are allocated inside the measured step (otherwise freeing the previous step's gradients
    at the start of the step would hide them: the level at the start would include them).
    """
    if before is not None:
        before()
    if str(device).startswith("cuda"):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def _unique_tensors(tensors):
    seen, out = set(), []
    for t in tensors:
        if t is None:
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in _unique_tensors(tensors))


def module_bytes(module, trainable_only=False):
    """Bytes of the module's parameters (+ buffers unless trainable_only), shared storages counted once."""
    if module is None:
        return 0
    tensors = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    if not trainable_only:
        tensors += list(module.buffers())
    return tensor_bytes(tensors)


def param_count(module, trainable_only=False):
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def optimizer_state_bytes(optimizer):
    return tensor_bytes([v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)])
