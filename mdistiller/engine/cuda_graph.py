"""SPEED.CUDA_GRAPHS: the whole update replayed as one CUDA graph.

On a GPU the update of a CIFAR-sized pair is bound by Python and kernel launches, not arithmetic (docs/bench):
hundreds of small kernels whose launch costs more than their work. A CUDA graph records the kernels of one
update (teacher forward, student forward and backward, loss terms, the update rule) once and replays them with one
launch. Replaying is exact only when a step never needs the host, so the engine keeps everything a step reads on
the device: the LR is a device tensor the schedule fills (UpdateRule.use_device_lr), the finite guard and CRD's
memory bank update their tensors in place, DOT's fp16 skip is decided on the device.

How `GraphedUpdate` steps:
  - the first WARMUP_STEPS updates run eagerly on a side stream (torch asks for this before a capture: lazily
    created optimizer state, cuDNN's algorithm choice, autocast's first casts);
  - the next update is captured: its batch is copied into static buffers, the update is recorded (not run) and
    then replayed once, which performs it;
  - every later batch of the same shapes is copied into the static buffers and the graph replayed. A batch of
    other shapes (the smaller last one of an epoch) runs eagerly; the graph's tensors stay the parameters' own,
    so both kinds of step update the same state;
  - a method's Python values other than the LR may change with the epoch (a loss ramp, DKD's warm-up), so the
    update is captured again at the first step of each epoch: a second's work per epoch.
The outputs (losses, logits, statistics) are the graph's static tensors, valid until the next replay: the loop and
its hooks read them within the step, as they read an eager step's.

A method whose update cannot be captured (a host wait, a shape that depends on data) says why through
`Distiller.prepare_capture()`; where a capture still fails the run goes on eagerly, with one line in train.log.
"""

import logging

import torch

logger = logging.getLogger("mdistiller")

WARMUP_STEPS = 3  # eager updates before the capture (torch's examples use a few)


def _signature(tensors):
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device, t.stride()) for t in tensors)


class CudaGraphs:
    """The capture backend: torch.cuda.CUDAGraph with a memory pool shared by successive captures."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.pool = torch.cuda.graph_pool_handle()
        self._side = torch.cuda.Stream(device=self.device)

    def run_on_side_stream(self, fn):
        """`fn()` on a side stream, ordered after and before the current stream's work (torch's warm-up rule)."""
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            out = fn()
        current.wait_stream(self._side)
        return out

    def capture(self, fn):
        """(replay, outputs): `fn()` recorded as a graph; its outputs are the graph's static tensors."""
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        # thread_local: a pin-memory or loader thread's CUDA call elsewhere does not invalidate the capture
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = fn()
        return graph.replay, outputs


class GraphedUpdate:
    """Replays `update(images, labels, index, epoch)` (Trainer's update: returns its outputs) as a CUDA graph; a
    drop-in for calling `update` directly. `backend`: CudaGraphs for `device` unless given (tests give one that
    replays by calling the recorded function again, to check the static-buffer logic on the CPU)."""

    def __init__(self, update, device, backend=None, warmup=WARMUP_STEPS, label="the update"):
        self.update, self.warmup, self.label = update, warmup, label
        self.backend = backend if backend is not None else CudaGraphs(device)
        self.eager_steps = 0
        self.captures = 0
        self.replays = 0
        self.disabled = None  # why the run went on eagerly, once a capture failed
        self._graph = None  # (epoch, replay, static inputs, outputs)
        self._shapes = None  # the batch signature captured: the first one after the warm-up

    def __call__(self, images, labels, index, epoch):
        inputs = (images, labels, index)
        if self.disabled is not None:
            return self._eager(inputs, epoch)
        if self.eager_steps < self.warmup:
            self.eager_steps += 1
            return self.backend.run_on_side_stream(lambda: self.update(images, labels, index, epoch))
        sig = _signature(inputs)
        if self._shapes is not None and sig != self._shapes:  # another shape: an epoch's smaller last batch
            return self._eager(inputs, epoch)
        graph = self._graph
        if graph is None or graph[0] != epoch:
            return self._capture(inputs, sig, epoch)
        _, replay, static, outputs = graph
        for dst, src in zip(static, inputs):
            if dst is not None:
                dst.copy_(src, non_blocking=True)
        replay()
        self.replays += 1
        return outputs

    def _eager(self, inputs, epoch):
        self.eager_steps += 1
        return self.update(*inputs, epoch)

    def _capture(self, inputs, sig, epoch):
        self._graph = None  # the previous epoch's graph: its memory returns to the pool
        static = tuple(None if t is None else t.clone() for t in inputs)
        try:
            replay, outputs = self.backend.capture(lambda: self.update(*static, epoch))
        except Exception as e:  # noqa: BLE001 - any failure of a capture means: run eagerly
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.disabled = f"{type(e).__name__}: {reason}"
            logger.warning("CUDA graphs off: capturing %s failed (%s); training goes on eagerly",
                           self.label, self.disabled)
            return self._eager(inputs, epoch)
        self.captures += 1
        replay()  # the capture only recorded this step: now it happens
        self.replays += 1
        self._shapes = sig
        self._graph = (epoch, replay, static, outputs)
        return outputs
