"""The engine's slots: per-sample state, input building and the step program's calls.

Cache states live in torch tensors on the step runner's device; the per-slot bookkeeping
touched every step (positions, noise, pixels) lives in host numpy arrays, where a batch-1
step costs microseconds of Python rather than a dozen tensor dispatches. On a GPU the two
large ones, the images so far and the noise, are mirrored on the device ("mirror"): the
program reads them there and its output pixels are written there, instead of a batch-4096 row
call uploading 3.2 MB of pixels and waiting for it. Active slots are kept packed at the front
of every per-slot array (a released slot takes the last active slot's row), so graphs run on
plain leading slices, never on idle slots.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..artifacts import NEXT, PIXEL, REFRESH, START
from ..kernels.sampling import noise_for
from .jobs import SampleJob
from .program import StepRunner


class SlotRunner:
    def __init__(self, runner: StepRunner, num_slots: int, mirror: bool | None = None) -> None:
        """`mirror`: keep the pixels and noise on the runner's device too; default: when it is not the CPU."""
        self.runner, self.spec = runner, runner.spec
        channels, height, width = self.spec.sample_shape
        device = runner.device
        self.states = {
            s.name: torch.zeros((num_slots, *s.shape), dtype=s.dtype.torch, device=runner.device)
            for s in self.spec.states
        }
        self.positions = np.zeros(num_slots, dtype=np.int64)
        self.temperature = np.zeros((num_slots, 1), dtype=np.float32)
        self.labels = np.zeros((num_slots, 1), dtype=np.int64)
        self.latents = np.zeros((num_slots, *(self.spec.latent_shape or (0,))), dtype=np.float32)
        self.pixels = np.zeros((num_slots, channels, height * width), dtype=np.uint8)
        self.mirror = device.type != "cpu" if mirror is None else mirror
        # Per position: (C,). Read only by the program: on its device when mirrored, else here.
        self.noise = (torch.zeros((num_slots, self.spec.length, channels), device=device) if self.mirror
                      else np.zeros((num_slots, self.spec.length, channels), dtype=np.float32))
        self.device_pixels = (torch.zeros((num_slots, channels, height * width), dtype=torch.uint8, device=device)
                              if self.mirror else None)
        self._span = torch.arange(self.spec.span, device=device)  # a step's offsets from its slots' positions
        self.slot_jobs: list[tuple[SampleJob, int] | None] = [None] * num_slots  # (job, k): sample k of job
        # The same as arrays, so that finishing rows works on all slots at once: id(job) (alive while it
        # holds a slot) and k.
        self.job_ids = np.zeros(num_slots, dtype=np.int64)
        self.sample_indices = np.zeros(num_slots, dtype=np.int64)
        self.active = 0
        # The states' leading slices per slot count, made once: the state tensors are only ever
        # written in place, and a slice costs microseconds of dispatch on every row call.
        self._leading_states: dict[int, list[torch.Tensor]] = {}

    def occupy(self, job: SampleJob, ks: range) -> None:
        """Puts samples `ks` of `job` into the next free slots, with fresh (zero) caches."""
        first, last = self.active, self.active + len(ks)
        for state in self.states.values():
            state[first:last].zero_()
        self.positions[first:last] = 0
        self.pixels[first:last] = 0
        if self.mirror:
            self.device_pixels[first:last].zero_()
        self.temperature[first:last] = job.temperature
        if job.labels is not None:
            self.labels[first:last, 0] = [job.labels[k] for k in ks]
        if job.latents is not None:
            self.latents[first:last] = job.latents[ks.start:ks.stop]
        channels, height, width = self.spec.sample_shape
        noise = noise_for([(job.seed, job.indices[k]) for k in ks], (channels, height * width))  # (n, C, H*W)
        self.noise[first:last] = noise.transpose(1, 2) if self.mirror else noise.transpose(1, 2).numpy()
        for slot, k in zip(range(first, last), ks):
            self.slot_jobs[slot] = (job, k)
        self.job_ids[first:last] = id(job)
        self.sample_indices[first:last] = ks
        self.active = last
        if START in self.spec.graphs:  # the samples' own states, from their latents
            self._run(START, slice(first, last))

    def release(self, slot: int) -> None:
        """Frees `slot`, moving the last active slot into its place to keep active slots packed."""
        last = self.active - 1
        if slot != last:
            for array in (*self.states.values(), self.positions, self.temperature, self.labels, self.latents,
                          self.noise, self.pixels, self.job_ids, self.sample_indices):
                array[slot] = array[last]
            if self.mirror:
                self.device_pixels[slot] = self.device_pixels[last]
            self.slot_jobs[slot] = self.slot_jobs[last]
        self.slot_jobs[last] = None
        self.active = last

    def execute(self) -> np.ndarray:
        """One call of the program on every active slot; returns the slots that just completed a row.

        `refresh` (where the program has one) runs on the slots starting a row, then `step` on all
        (one in-place `run_row` call instead where the runner has one and every slot starts a row);
        each slot's pixels are written and its position advances by the program's span.
        """
        n = self.active
        positions = self.positions[:n]
        starting = np.flatnonzero(positions % self.spec.period == 0) if REFRESH in self.spec.graphs else []
        if len(starting) == n and self.runner.row_inputs:  # one in-place call: refresh, then step
            feeds = self._feeds(self.runner.row_inputs, slice(0, n))
            pixel = self.runner.run_row(feeds, self._states_of_first(n))
        else:
            if len(starting) == n:
                self._run(REFRESH, slice(0, n))
            elif len(starting):
                self._run(REFRESH, starting)
            pixel = self._run("step", slice(0, n))[PIXEL]
        if self.mirror:  # (n, C, span) of the mirror's (n, C, H * W), at each slot's positions
            taken = self._taken(slice(0, n))[:, None, :].expand(-1, pixel.shape[2], -1)
            self.device_pixels[:n].scatter_(2, taken, pixel.transpose(1, 2).to(torch.uint8))
        pixel = pixel.cpu().numpy()  # (n, span, C)
        span = self.spec.span  # which divides the length: a slot's positions are always a multiple of it
        steps = self.pixels.reshape(len(self.pixels), pixel.shape[2], -1, span)  # a view: (slots, C, steps, span)
        steps[np.arange(n), :, positions // span] = pixel.transpose(0, 2, 1)
        positions += span
        return np.flatnonzero(positions % self.spec.sample_shape[2] == 0)

    def _states_of_first(self, n: int) -> list[torch.Tensor]:
        """The program's states (in order) of slots 0..n-1, as views of the engine's own."""
        views = self._leading_states.get(n)
        if views is None:
            views = self._leading_states[n] = [self.states[s.name][:n] for s in self.spec.states]
        return views

    def completed_rows(self, slots: np.ndarray) -> Iterator[tuple[SampleJob, np.ndarray, np.ndarray, np.ndarray,
                                                                   np.ndarray]]:
        """Per job among `slots` (which have just completed a row): (job, its slots there, their sample
        indices k, rows, the rows' pixels (m, C, W)). A loop over jobs, not slots: thousands of slots
        finish a row together at large batch sizes."""
        channels, height, width = self.spec.sample_shape
        rows = self.positions[slots] // width - 1
        pixels = self.pixels.reshape(-1, channels, height, width)[slots, :, rows]  # (m, C, W)
        ids = self.job_ids[slots]
        for job_id in np.unique(ids):
            mine = np.flatnonzero(ids == job_id)
            job, _ = self.slot_jobs[slots[mine[0]]]
            yield job, slots[mine], self.sample_indices[slots[mine]], rows[mine], pixels[mine]

    def _run(self, graph: str, slots: slice | np.ndarray) -> dict[str, torch.Tensor]:
        """Runs `graph` on `slots` (a leading slice, or indices) and stores the states it returns."""
        signature, device = self.spec.graphs[graph], self.runner.device
        rows = slots if isinstance(slots, slice) else torch.from_numpy(slots).to(device)
        feeds = self._feeds(signature.inputs, slots, rows)
        outputs = self.runner.run(graph, feeds)
        for name in signature.outputs:
            if name.startswith(NEXT):
                state = self.states[name[len(NEXT):]]
                if isinstance(slots, slice):
                    state[slots].copy_(outputs[name])
                else:
                    state.index_copy_(0, rows, outputs[name].to(device))
        return outputs

    def _feeds(self, names, slots: slice | np.ndarray, rows=None) -> dict[str, torch.Tensor]:
        """The named inputs (states, or controls built from the slot bookkeeping) of `slots`."""
        channels, height, width = self.spec.sample_shape
        device = self.runner.device
        feeds = {}
        on_device = slots if rows is None else rows  # what picks the slots of a tensor on the device
        for name in names:
            if name in self.states:
                feeds[name] = self.states[name][on_device]
                continue
            if self.mirror and name == "pixels":
                feeds[name] = self.device_pixels[on_device].view(-1, channels, height, width)
                continue
            if self.mirror and name == "noise":
                taken = self._taken(slots)[:, :, None].expand(-1, -1, channels)
                feeds[name] = torch.gather(self.noise[on_device], 1, taken)
                continue
            if name == "noise":  # the noise of the step's pixels, (n, span, C)
                picked = self.noise[slots]
                taken = self.positions[slots, None] + np.arange(self.spec.span)
                value = picked[np.arange(len(picked))[:, None], taken]
            elif name == "positions":
                value = self.positions[slots, None]
            elif name == "pixels":
                value = self.pixels[slots].reshape(-1, channels, height, width)
            else:  # temperature, labels, latents
                value = getattr(self, name)[slots]
            feeds[name] = torch.from_numpy(np.ascontiguousarray(value)).to(device)
        return feeds

    def _taken(self, slots: slice | np.ndarray) -> torch.Tensor:
        """The positions a step call of `slots` takes, (n, span), on the runner's device."""
        return torch.from_numpy(self.positions[slots]).to(self.runner.device)[:, None] + self._span
