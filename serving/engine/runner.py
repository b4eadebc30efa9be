"""The engine's slots: per-sample state, input building and the step program's calls.

Cache states live in torch tensors on the step runner's device. What else the program reads of
a slot, its controls (position, temperature, label, latents, noise, image so far), lives where
the program runs:
- for a program on the CPU, in numpy arrays, where a batch-1 step costs microseconds of Python
  rather than a dozen tensor dispatches; the fused operators' multi-row call (`run_rows`) reads
  the noise, writes the pixels and advances the positions there itself, in place;
- for a program on a GPU, in tensors on the device ("mirrored"): the program reads them in place
  and its pixels are written there, so a step uploads nothing and waits for nothing. The host
  waits only to copy images out: after each row for a job that reports progress, else once per
  sample, when it finishes. (Uploading the controls for every row call made each upload wait for
  the GPU's queue to drain: on an H200 the GPU stood idle for 30% of a batch of 4096.)
The host keeps each slot's position in any case, to know when rows complete. Active slots are
kept packed at the front of every per-slot array (a released slot takes the last active slot's
row), so graphs run on plain leading slices, never on idle slots.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ..artifacts import NEXT, PIXEL, REFRESH, START
from ..kernels.sampling import noise_for
from .graphs import RowGraphs
from .jobs import SampleJob
from .program import StepRunner


class SlotRunner:
    def __init__(self, runner: StepRunner, num_slots: int, mirror: bool | None = None) -> None:
        """`mirror`: keep the controls on the runner's device (default: when that is not the CPU)."""
        self.runner, self.spec = runner, runner.spec
        channels, height, width = self.spec.sample_shape
        self.mirror = runner.device.type != "cpu" if mirror is None else mirror
        self.states = {
            s.name: torch.zeros((num_slots, *s.shape), dtype=s.dtype.torch, device=runner.device)
            for s in self.spec.states
        }
        self.positions = np.zeros(num_slots, dtype=np.int64)  # the host's own, to find completed rows

        def control(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | np.ndarray:
            tensor = torch.zeros((num_slots, *shape), dtype=dtype, device=runner.device if self.mirror else "cpu")
            return tensor if self.mirror else tensor.numpy()

        self.controls = {  # by feed name; each (num_slots, ...)
            # on the host, the program's positions are a view of the host's
            "positions": control(1, dtype=torch.int64) if self.mirror else self.positions[:, None],
            "temperature": control(1),
            "labels": control(1, dtype=torch.int64),
            "latents": control(*(self.spec.latent_shape or (0,))),
            "noise": control(self.spec.length, channels),  # per position: (C,)
            "pixels": control(channels, height * width, dtype=torch.uint8),
        }
        self._slot_index = torch.arange(num_slots, device=runner.device) if self.mirror else np.arange(num_slots)
        self._span = torch.arange(self.spec.span, device=runner.device)  # a step's offsets from its positions
        # Several whole rows per call through the runner's `run_rows`, on the host's own controls.
        self.whole_rows = runner.runs_rows and not self.mirror
        self.slot_jobs: list[tuple[SampleJob, int] | None] = [None] * num_slots  # (job, k): sample k of job
        # The same as arrays, so that finishing rows works on all slots at once: id(job) (alive while it
        # holds a slot) and k.
        self.job_ids = np.zeros(num_slots, dtype=np.int64)
        self.sample_indices = np.zeros(num_slots, dtype=np.int64)
        self.active = 0
        # The states' leading slices per slot count, made once: the state tensors are only ever
        # written in place, and a slice costs microseconds of dispatch on every row call.
        self._leading_states: dict[int, list[torch.Tensor]] = {}
        self._leading_controls: dict[int, dict[str, torch.Tensor]] = {}  # the same for the row call's controls
        # The mirrored row's CUDA graphs, one per slot count, all captured now: each replays the whole row
        # (noise picked, row call, pixels written, positions advanced) on the engine's own tensors.
        self.row_graphs = None
        if runner.row_graph_slots and runner.row_inputs and self.mirror:
            self.row_graphs = RowGraphs(self._device_row, runner.row_graph_slots, copy_inputs=False)
            for n in range(1, min(num_slots, runner.row_graph_slots) + 1):
                self.row_graphs.prepare(self._row_controls(n), self._states_of_first(n))

    def occupy(self, job: SampleJob, ks: range) -> None:
        """Puts samples `ks` of `job` into the next free slots, with fresh (zero) caches."""
        first, last = self.active, self.active + len(ks)
        taken = slice(first, last)
        for state in self.states.values():
            state[taken].zero_()
        self.positions[taken] = 0
        channels, height, width = self.spec.sample_shape
        noise = noise_for([(job.seed, job.indices[k]) for k in ks], (channels, height * width))  # (n, C, H*W)
        self._set("positions", taken, 0)
        self._set("pixels", taken, 0)
        self._set("temperature", taken, job.temperature)
        self._set("noise", taken, noise.transpose(1, 2))
        if job.labels is not None:
            self._set("labels", taken, torch.tensor([job.labels[k] for k in ks])[:, None])
        if job.latents is not None:
            self._set("latents", taken, torch.from_numpy(job.latents[ks.start:ks.stop]))
        for slot, k in zip(range(first, last), ks):
            self.slot_jobs[slot] = (job, k)
        self.job_ids[taken] = id(job)
        self.sample_indices[taken] = ks
        self.active = last
        if START in self.spec.graphs:  # the samples' own states, from their latents
            self._run(START, taken)

    def _set(self, name: str, slots: slice, value: torch.Tensor | float) -> None:
        """Writes `value` (a CPU tensor or a number) into control `name` of `slots`."""
        if self.mirror:
            self.controls[name][slots] = value
        else:
            self.controls[name][slots] = value.numpy() if isinstance(value, torch.Tensor) else value

    def release(self, slot: int) -> None:
        """Frees `slot`, moving the last active slot into its place to keep active slots packed."""
        last = self.active - 1
        if slot != last:
            for array in (*self.states.values(), *self.controls.values(), self.positions, self.job_ids,
                          self.sample_indices):
                array[slot] = array[last]
            self.slot_jobs[slot] = self.slot_jobs[last]
        self.slot_jobs[last] = None
        self.active = last

    def execute(self, rows: int = 1) -> np.ndarray:
        """One call of the program on every active slot; returns the slots that just completed `rows` rows.

        `refresh` (where the program has one) runs on the slots starting a row, then `step` on all
        (one in-place `run_row` call instead where the runner has one and every slot starts a row);
        each slot's pixels are written and its position advances by the program's span. Where
        `whole_rows`, one `run_rows` call runs `rows` whole rows (otherwise `rows` must be 1).
        """
        n = self.active
        if self.whole_rows:  # every slot starts a row at every call: all complete `rows` rows
            self.runner.run_rows(self._row_controls(n), self._states_of_first(n), rows)
            return self._slot_index[:n]
        if rows != 1:
            raise ValueError(f"this program runs one row per call, not {rows}")
        positions = self.positions[:n]
        starting = np.flatnonzero(positions % self.spec.period == 0) if REFRESH in self.spec.graphs else []
        if len(starting) == n and self.runner.row_inputs:  # one in-place call: refresh, then step
            if self.mirror:  # pixels written and program positions advanced by the row itself
                (self.row_graphs or self._device_row)(self._row_controls(n), self._states_of_first(n))
            else:
                pixel = self.runner.run_row({**self._row_controls(n), **self._feeds(("noise",), slice(0, n))},
                                            self._states_of_first(n))
                self._write_pixels(pixel, n)
        else:
            if len(starting) == n:
                self._run(REFRESH, slice(0, n))
            elif len(starting):
                self._run(REFRESH, starting)
            self._write_pixels(self._run("step", slice(0, n))[PIXEL], n)
        positions += self.spec.span  # on the host, also the program's positions
        return np.flatnonzero(positions % self.spec.sample_shape[2] == 0)

    def _write_pixels(self, pixel: torch.Tensor, n: int) -> None:
        """The step's pixels (n, span, C) into the images of slots 0..n-1, at each slot's positions;
        on the device, the program's positions advance too."""
        images, span = self.controls["pixels"], self.spec.span
        if self.mirror:
            program_positions = self.controls["positions"][:n]
            self._scatter_pixels(images[:n], program_positions, pixel)
            program_positions += span
        else:  # span divides the length, so positions are multiples of it: a step fills one (C, span) block
            blocks = images.reshape(len(images), images.shape[1], -1, span)  # a view
            blocks[self._slot_index[:n], :, self.positions[:n] // span] = pixel.numpy().transpose(0, 2, 1)

    def _scatter_pixels(self, images: torch.Tensor, positions: torch.Tensor, pixel: torch.Tensor) -> None:
        """A step's pixels (n, span, C) into device images (n, C, H * W) at positions (n, 1) onwards."""
        taken = (positions + self._span)[:, None, :].expand(-1, pixel.shape[2], -1)  # (n, C, span)
        images.scatter_(2, taken, pixel.transpose(1, 2).to(torch.uint8))

    def _device_row(self, controls: dict[str, torch.Tensor | None], states: list[torch.Tensor]) -> torch.Tensor:
        """A whole row of slots 0..n-1 on the device, from its controls (`_row_controls`) alone: the noise
        picked at the slots' positions, the row call, its pixels written into the images, the positions
        advanced. It reads and writes nothing but `controls` and `states`, which are the engine's own
        tensors, so a CUDA graph of it replays with nothing to copy: a row costs the host one replay."""
        positions, images, noise = controls["positions"], controls["pixels"], controls["noise"]
        n, span = len(positions), self.spec.span
        blocks = noise.reshape(n, -1, span, noise.shape[2])  # (n, blocks, span, C)
        feeds = {name: controls[name] for name in self.runner.row_inputs if name not in ("pixels", "noise")}
        feeds["pixels"] = images.reshape(n, *self.spec.sample_shape)
        feeds["noise"] = blocks[self._slot_index[:n], positions[:, 0] // span]  # (n, span, C)
        pixel = self.runner.run_row(feeds, states)
        self._scatter_pixels(images, positions, pixel)
        positions += span
        return pixel

    def _row_controls(self, n: int) -> dict[str, torch.Tensor | None]:
        """The row call's controls of slots 0..n-1 as views of the controls, made once per slot count (the
        controls are only written in place). The noise is the slots' whole images' (a row call on the
        host picks its part: `_feeds`; a device row picks it itself; `run_rows` picks per row), and the
        pixels (n, C, H * W) on the device, (n, C, H, W) on the host."""
        views = self._leading_controls.get(n)
        if views is None:
            views = self._leading_controls[n] = self._control_views(n)
        return views

    def _control_views(self, n: int) -> dict[str, torch.Tensor | None]:
        names = self.runner.row_inputs if not self.whole_rows else ("pixels", "positions", "temperature", "labels")
        views = self._feeds([name for name in names if name != "noise"], slice(0, n))
        if self.whole_rows:
            views["noise"] = torch.from_numpy(self.controls["noise"][:n])
            views["labels"] = views["labels"] if self.spec.num_classes else None
        elif self.mirror:
            views["noise"] = self.controls["noise"][:n]
            views["pixels"] = self.controls["pixels"][:n]
        return views

    def _states_of_first(self, n: int) -> list[torch.Tensor]:
        """The program's states (in order) of slots 0..n-1, as views of the engine's own."""
        views = self._leading_states.get(n)
        if views is None:
            views = self._leading_states[n] = [self.states[s.name][:n] for s in self.spec.states]
        return views

    def completed_rows(self, slots: np.ndarray) -> Iterator[tuple[SampleJob, np.ndarray, np.ndarray, np.ndarray]]:
        """Per job among `slots` (which have just completed rows): (job, its slots there, their sample
        indices k, the rows each has done). A loop over jobs, not slots: thousands of slots finish a
        row together at large batch sizes."""
        rows_done = self.positions[slots] // self.spec.sample_shape[2]
        ids = self.job_ids[slots]
        if (ids == ids[0]).all():  # one job: at batch 1, or a single large request
            job, _ = self.slot_jobs[slots[0]]
            yield job, slots, self.sample_indices[slots], rows_done
            return
        for job_id in np.unique(ids):
            mine = np.flatnonzero(ids == job_id)
            job, _ = self.slot_jobs[slots[mine[0]]]
            yield job, slots[mine], self.sample_indices[slots[mine]], rows_done[mine]

    def images(self, slots: np.ndarray) -> np.ndarray:
        """The images so far of `slots`: (m, C, H, W) uint8 on the host. Mirrored, this waits for the
        device to finish every call made so far."""
        channels, height, width = self.spec.sample_shape
        if not self.mirror:
            return self.controls["pixels"][slots].reshape(-1, channels, height, width)
        index = torch.from_numpy(slots).to(self.runner.device)
        return self.controls["pixels"][index].cpu().numpy().reshape(-1, channels, height, width)

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
        """The named inputs (states, or controls) of `slots`; `rows` picks them on the device (default: `slots`)."""
        channels, height, width = self.spec.sample_shape
        device = self.runner.device
        on_device = slots if rows is None else rows
        pick = on_device if self.mirror else slots  # what picks the slots of a control
        feeds = {}
        for name in names:
            if name in self.states:
                feeds[name] = self.states[name][on_device]
                continue
            if name == "noise":  # of the step's pixels, (n, span, C): a block of `span` positions per slot
                span = self.spec.span
                blocks = self.controls["noise"].reshape(len(self._slot_index), -1, span, channels)
                control = blocks[self._slot_index[pick], self.controls["positions"][pick, 0] // span]
            else:
                control = self.controls[name][pick]
                if name == "pixels":
                    control = control.reshape(-1, channels, height, width)
            feeds[name] = control if self.mirror else torch.from_numpy(np.ascontiguousarray(control)).to(device)
        return feeds
