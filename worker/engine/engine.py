"""The continuous-batching engine: admission into fixed slots, one decode step per ``step()``."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
from transformers import PreTrainedModel, ProcessorMixin

from worker.collector import CLOCK as COLLECTOR_CLOCK
from worker.engine.decode import DecodeStep
from worker.engine.graphs import (
    ADMISSION_PRIORITY,
    DECODE_PRIORITY,
    DecodeGraphs,
    batch_buckets,
    length_buckets,
    pick,
)
from worker.engine.images import ImageChunk, ImageEncoder, ImageJob, PhaseClock
from worker.engine.inputs import PreparedRequest, prepare_request, to_device
from worker.engine.parts import MllamaParts
from worker.engine.prefill import PREFILL_ROWS, TextPrefill, cross_masks, visible_tiles
from worker.engine.sampling import sample
from worker.engine.slots import SlotCache, plan_capacity
from worker.model.generation import Generation, GenerationRequest

logger = logging.getLogger(__name__)

# Requests admitted together at most (their images encode in chunks of VISION_BATCHES sizes).
MAX_PREFILL_BATCH = max(PREFILL_ROWS)
# Admissions in flight at most: the next one gathers requests while the one before is encoded.
ADMISSIONS_IN_FLIGHT = 2
# Pieces of admission work (an image chunk, an admission's prompts) queued on the side stream
# at most while rows decode. Every piece of an admission at once filled the stream's queue, and
# a launch onto a full queue blocks the engine thread, and the decode steps it launches, until
# the GPU drains it (~200 ms, BENCHMARKS.md run 8). One at a time left the side stream idle
# between pieces (-17 % throughput); two keep it busy without a block (run 10).
SIDE_PIECES = 2


@dataclass
class EngineStats:
    """Cumulative counters; read deltas between two moments."""

    prefill_ms: float = 0.0  # wall time of admission on the engine thread (overlapped work not)
    vision_ms: float = 0.0  # GPU time of the vision tower
    cross_kv_ms: float = 0.0  # GPU time of the projector and the cross K/V projections
    text_prefill_ms: float = 0.0  # GPU time of the prompts' prefill and first-token sampling
    admission_host_ms: float = 0.0  # host time launching admissions (no GPU wait)
    longest_decode_gap_ms: float = 0.0  # longest time between two decode steps of running rows
    # Within that longest gap: the engine thread admitting, and taking launched steps' tokens
    # (waiting for the GPU to finish them included; a compaction takes the step in flight's
    # early); the rest is other host work.
    longest_gap_admit_ms: float = 0.0
    longest_gap_read_ms: float = 0.0
    # The admitting of the longest gap by phase: launching images, launching prompts, and
    # installing finished admissions (their first tokens read).
    longest_gap_admit_parts: dict[str, float] = field(default_factory=dict)
    # Within that longest gap: Python's garbage collector, in whichever thread it ran.
    longest_gap_gc_ms: float = 0.0
    decode_ms: float = 0.0
    decode_steps: int = 0
    tokens: int = 0  # generated tokens, first tokens included
    admitted: int = 0
    finished: int = 0  # requests returned, failed ones included
    images_encoded: int = 0
    images_reused: int = 0  # admissions whose cross K/V were already resident


@dataclass(frozen=True)
class FinishedRequest:
    """A request as it leaves the engine: its answer tokens, or the exception that ended it."""

    key: str
    token_ids: list[int] = field(default_factory=list)  # EOS included when it ended on one
    prompt_tokens: int = 0
    error: Exception | None = None


@dataclass
class _Waiting:
    key: str
    request: GenerationRequest
    prepared: PreparedRequest
    aborted: bool = False


@dataclass
class _NewRows:
    """Decode state of admitted requests: computed where they were prefilled, installed in the
    slot buffers on the decode stream."""

    slots: torch.Tensor
    first: torch.Tensor  # first tokens
    positions: torch.Tensor
    cross_mask: torch.Tensor
    cross_length: torch.Tensor
    row_gate: torch.Tensor
    greedy: torch.Tensor
    temperature: torch.Tensor
    top_p: torch.Tensor


@dataclass
class _Admission:
    """Requests being admitted into reserved slots: on CUDA, their images are encoded and their
    prompts prefilled on a side stream while decode steps go on."""

    batch: list[_Waiting]
    slots: list[int]
    chunks: list[ImageChunk]  # images not launched yet
    host_ms: float
    clocks: list[PhaseClock] = field(default_factory=list)  # per image chunk, then the prompts'
    ready: torch.cuda.Event | None = None  # the work launched so far is done; None: done (CPU)
    rows: _NewRows | None = None  # set once the prompts are launched

    def done(self) -> bool:
        return self.ready is None or self.ready.query()


@dataclass
class _Running:
    key: str
    request: GenerationRequest
    prompt_tokens: int
    tokens: list[int]
    pending: int = 0  # decode steps launched for it whose token is not read back yet

    @property
    def position(self) -> int:
        """Where the next decode input (the last generated token) goes in the slot's cache:
        after the tokens read back and those of the steps still in flight."""
        return self.prompt_tokens + len(self.tokens) - 1 + self.pending


@dataclass
class _Launched:
    """A decode step queued on the GPU whose tokens are not read back yet: the rows it ran
    (slot index, request) and its tokens, copied to the host when ``copied`` is done."""

    rows: list[tuple[int, _Running]]
    tokens: torch.Tensor
    copied: torch.cuda.Event | None


class ContinuousEngine:
    """Iteration-level batching of Mllama requests over fixed slots, decode in CUDA graphs.

    ``submit`` queues requests (from any thread); ``step`` (from one thread) admits waiting
    requests into free slots, runs one decode step for every active slot and returns the
    requests that finished. On CUDA an admission's images are encoded on a side stream while
    the running rows keep decoding, one piece of work at a time (a chunk of images, then the
    prompts), each launched in the first step after the one before it is done; up to
    ``ADMISSIONS_IN_FLIGHT`` admissions queue their pieces one after another.
    ``max_slots`` / ``max_seq_len`` default to what ``memory_fraction`` of the free GPU memory
    holds, within ``memory_limit`` bytes for all of the process's tensors if given (8 slots of
    512 tokens on CPU). ``skip_padding_tiles``: see ``worker.engine.vision``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        *,
        max_slots: int | None = None,
        max_seq_len: int | None = None,
        cuda_graphs: bool = True,
        compiled: bool = True,
        memory_fraction: float = 0.9,
        memory_limit: int | None = None,
        skip_padding_tiles: bool = False,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.parts = MllamaParts(model)
        self.device = self.parts.device
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos)

        capacity = plan_capacity(
            self.parts.geometry,
            model.config.vision_config,
            self.parts.dtype,
            self.device,
            max_slots=max_slots,
            max_seq_len=max_seq_len,
            memory_fraction=memory_fraction,
            memory_limit=memory_limit,
        )
        self.max_slots = capacity.max_slots
        self.max_seq_len = capacity.max_seq_len
        self.cache = SlotCache(
            self.parts.geometry, self.max_slots, self.max_seq_len, self.parts.dtype, self.device
        )
        with torch.inference_mode():
            self._rope = self.parts.rope_table(self.max_seq_len)
        self._graphs = DecodeGraphs(
            DecodeStep(self.parts, self.cache, self._rope, compiled=compiled),
            batch_buckets(self.max_slots),
            length_buckets(self.max_seq_len),
            use_graphs=cuda_graphs and self.device.type == "cuda",
        )
        self.images = ImageEncoder(
            self.parts, self.cache, skip_padding_tiles=skip_padding_tiles, cuda_graphs=cuda_graphs
        )
        cuda = self.device.type == "cuda"
        self._prefill = TextPrefill(
            self.parts, self.cache, self._rope, use_graphs=cuda_graphs and cuda
        )
        with torch.inference_mode():
            self._graphs.capture()
            self.images.capture()
            self._prefill.capture()
        # Decode on a high-priority stream, admission on a low one: when both have kernels
        # ready, the GPU schedules decode's blocks first, so running answers keep stepping.
        # (Graph kernels run at the priority they were captured at: see capture_graphs.)
        self._side_stream = (
            torch.cuda.Stream(self.device, priority=ADMISSION_PRIORITY) if cuda else None
        )
        self._decode_stream = (
            torch.cuda.Stream(self.device, priority=DECODE_PRIORITY) if cuda else None
        )
        if self._decode_stream is not None:
            self._decode_stream.wait_stream(torch.cuda.current_stream(self.device))
        logger.info(
            "engine: %d slots x %d tokens, %.2f GiB of caches, graphs %s",
            self.max_slots, self.max_seq_len, self.cache.nbytes / 2**30, self._graphs.use_graphs,
        )  # fmt: skip

        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._waiting: deque[_Waiting] = deque()
        # Finished outside a decode step: failed at submit or admission, or done at the first token.
        self._returned: list[FinishedRequest] = []
        self._keys: set[str] = set()
        self._slots: list[_Running | None] = [None] * self.max_slots
        self._reserved: set[int] = set()  # slots of the admissions in flight
        self._admissions: deque[_Admission] = deque()  # in flight, oldest first
        self._side_pieces: deque[torch.cuda.Event] = deque()  # launched, maybe not done
        self._resident: list[str | None] = [None] * self.max_slots  # image key of the cross K/V
        self._last_decode: float | None = None  # when the last decode step with rows ended
        self._collected_ms = 0.0  # the collector's total when the last decode step ended
        self._read_ms = 0.0  # taking launched steps' tokens since the last decode step ended
        self._admit_ms = 0.0  # the last admission's time on the engine thread
        self._admit_parts: dict[str, float] = {}  # ... by phase
        # The step in flight: the next one is launched before its tokens are read, so the GPU
        # does not wait for the host's bookkeeping between steps.
        self._launched: _Launched | None = None
        pin = self.device.type == "cuda"
        self._host_tokens = [
            torch.empty(self.max_slots, dtype=torch.long, pin_memory=pin) for _ in range(2)
        ]

    # -- public API -----------------------------------------------------------------------

    @property
    def graph_capture_s(self) -> float:
        """Seconds the start-up graph capture took: decode, vision and text prefill (0 without
        graphs)."""
        return self._graphs.capture_s + self.images.graphs.capture_s + self._prefill.capture_s

    @property
    def free_slots(self) -> int:
        """Slots no running request holds and no admission has reserved."""
        return self.max_slots - self.active - len(self._reserved)

    @property
    def active(self) -> int:
        """Requests holding a slot (decoding)."""
        return sum(slot is not None for slot in self._slots)

    @property
    def waiting(self) -> int:
        """Requests submitted but not admitted yet, failed ones still to be returned included."""
        with self._lock:
            return len(self._waiting) + len(self._returned)

    def has_work(self) -> bool:
        """Whether any request is waiting, being admitted, running, or failed and not yet
        returned."""
        return self.active > 0 or self.waiting > 0 or bool(self._admissions)

    def submit(self, key: str, request: GenerationRequest) -> None:
        """Queue ``request`` under ``key`` (unique among requests in the engine).

        Raises ValueError if it can never fit a slot (prompt + max_new_tokens > max_seq_len).
        A request the processor cannot read is accepted and comes back from ``step`` as its
        exception.
        """
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        with self._lock:
            if key in self._keys:
                raise ValueError(f"request key {key!r} is already in the engine")
            self._keys.add(key)
        try:
            prepared = prepare_request(self.processor, request)
            # In the compute dtype and pinned here, off the engine thread: the engine's copy
            # to the GPU then never blocks it.
            pixels = prepared.pixel_values.to(self.parts.dtype)
            if self.device.type == "cuda":
                pixels = pixels.pin_memory()
            prepared = replace(prepared, pixel_values=pixels)
        except Exception as exc:
            with self._lock:
                self._returned.append(FinishedRequest(key=key, error=exc))
            return
        needed = prepared.prompt_tokens + request.max_new_tokens
        if needed > self.max_seq_len:
            with self._lock:
                self._keys.discard(key)
            raise ValueError(
                f"request {key!r} needs {prepared.prompt_tokens} prompt + "
                f"{request.max_new_tokens} new tokens = {needed} > max_seq_len {self.max_seq_len}"
            )
        with self._lock:
            self._waiting.append(_Waiting(key, request, prepared))

    def abort(self, keys: Iterable[str]) -> None:
        """Drop requests by key, waiting or running; their slots are free at once and they
        never come back from ``step``. Call it from the thread that calls ``step``."""
        keys = set(keys)
        with self._lock:
            self._waiting = deque(w for w in self._waiting if w.key not in keys)
            self._returned = [f for f in self._returned if f.key not in keys]
            self._keys -= keys
        for admission in self._admissions:
            for waiting in admission.batch:
                waiting.aborted = waiting.aborted or waiting.key in keys
        with self._on_decode_stream():
            for slot, running in enumerate(self._slots):
                if running is not None and running.key in keys:
                    self._slots[slot] = None
                    self.cache.release(slot)

    def step(self) -> list[tuple[str, Generation | Exception]]:
        """Admit, decode one token for every active slot, return what finished in this step."""
        finished = self.step_outputs()
        if not finished:
            return []  # some tokenizer versions decode an empty batch to [""]
        texts = self.tokenizer.batch_decode(
            [f.token_ids for f in finished], skip_special_tokens=True
        )
        results: list[tuple[str, Generation | Exception]] = []
        for done, text in zip(finished, texts, strict=True):
            if done.error is not None:
                results.append((done.key, done.error))
            else:
                answer = Generation(
                    text=text.strip(),
                    prompt_tokens=done.prompt_tokens,
                    answer_tokens=len(done.token_ids),
                )
                results.append((done.key, answer))
        return results

    def step_outputs(self) -> list[FinishedRequest]:
        """``step`` with token ids instead of decoded text."""
        with torch.inference_mode(), self._on_decode_stream():
            self._admit()
            finished = self._decode() if self.active else []
            if not self.active:
                self._launched = None  # ran only rows that had finished: nothing to read
            finished += self._compact()
        with self._lock:
            finished, self._returned = self._returned + finished, []
            self._keys.difference_update(f.key for f in finished)
        self.stats.finished += len(finished)
        return finished

    # -- admission --------------------------------------------------------------------------

    def _admit(self) -> None:
        """Start admissions for waiting requests, launch their next pieces of work on the side
        stream as it has room, and install those whose work is done, without waiting while
        rows decode. With nothing decoding, the oldest admission runs to completion at once."""
        start = time.perf_counter()
        self._admit_parts = dict.fromkeys(("images", "prompts", "install"), 0.0)
        while True:
            while len(self._admissions) < ADMISSIONS_IN_FLIGHT:
                with self._lock:
                    count = min(self.free_slots, MAX_PREFILL_BATCH, len(self._waiting))
                    batch = [self._waiting.popleft() for _ in range(count)]
                if not batch:
                    break
                admission = self._start_admission(batch)
                if admission is not None:
                    self._admissions.append(admission)
            if not self._admissions:
                break
            if not self.active:
                self._advance(self._admissions.popleft())
                continue
            self._launch_pieces()
            while self._admissions and self._admissions[0].rows is not None:
                if not self._admissions[0].done():
                    break
                self._finish_admission(self._admissions.popleft())
            break
        self._admit_ms = _ms_since(start)
        self.stats.prefill_ms += self._admit_ms

    def _launch_pieces(self) -> None:
        """Launch admission pieces, oldest admission first, while fewer than ``SIDE_PIECES``
        launched ones are still running."""
        while self._side_pieces and self._side_pieces[0].query():
            self._side_pieces.popleft()
        for admission in list(self._admissions):
            while admission.rows is None and len(self._side_pieces) < SIDE_PIECES:
                if not self._launch_piece(admission):
                    self._admissions.remove(admission)
                    break
                if admission.ready is not None:
                    self._side_pieces.append(admission.ready)

    def _start_admission(self, batch: list[_Waiting]) -> _Admission | None:
        """Reserve slots and give them the cross K/V already resident; the images still to
        encode are launched piece by piece (:meth:`_launch_piece`). None if it failed (then
        handled)."""
        start = time.perf_counter()
        slots = self._allocate(batch)
        self._reserved.update(slots)
        try:
            chunks = self.images.chunks(self._reuse_cross_kv(batch, slots))
            host_ms = _ms_since(start)
            self._admit_parts["images"] += host_ms
            return _Admission(batch, slots, chunks, host_ms)
        except Exception as exc:
            self._release(slots)
            self._failed_admission(batch, exc)
            return None

    def _on_decode_stream(self) -> AbstractContextManager[object]:
        """Where the engine's slot state and decode steps live (the CPU: nothing to do)."""
        stream = self._decode_stream
        return nullcontext() if stream is None else torch.cuda.stream(stream)

    @contextmanager
    def _on_side_stream(self) -> Iterator[torch.cuda.Stream | None]:
        """Run admission work on the side stream (after what the decode stream queued so far:
        slot copies), or inline on the CPU."""
        side = self._side_stream
        if side is None:
            yield None
            return
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            yield side

    def _advance(self, admission: _Admission) -> None:
        """Launch the rest of an admission's work at once, then wait for it and install it."""
        while admission.rows is None:
            if not self._launch_piece(admission):
                return
        self._finish_admission(admission)

    def _launch_piece(self, admission: _Admission) -> bool:
        """Launch an admission's next piece of work on the side stream: an image chunk, else
        its prompts. False if that failed (the admission is then over and handled)."""
        start = time.perf_counter()
        phase = "images" if admission.chunks else "prompts"
        try:
            with self._on_side_stream() as side:
                if admission.chunks:
                    clock = self.images.encode_chunk(admission.chunks.pop(0))
                else:
                    clock = PhaseClock(self.device)
                    clock.mark("start")
                    admission.rows = self._launch_prefill(admission.batch, admission.slots)
                    clock.mark("end")
                admission.ready = _record(side)
        except Exception as exc:
            self._release(admission.slots)
            self._failed_admission([w for w in admission.batch if not w.aborted], exc)
            return False
        admission.clocks.append(clock)
        host_ms = _ms_since(start)
        admission.host_ms += host_ms
        self._admit_parts[phase] += host_ms
        return True

    def _failed_admission(self, batch: list[_Waiting], exc: Exception) -> None:
        """A batch whose admission raised: a lone request fails with the exception, a batch
        is admitted again at once, one request at a time, so only the culprit fails."""
        if len(batch) == 1:
            with self._lock:
                self._returned.append(FinishedRequest(key=batch[0].key, error=exc))
            return
        logger.exception("batched admission of %d failed; retrying one by one", len(batch))
        for waiting in batch:
            admission = self._start_admission([waiting])
            if admission is not None:
                self._advance(admission)

    def _finish_admission(self, admission: _Admission) -> None:
        """Install the decode state of an admission whose work is done (or queued before on the
        decode stream), read the first tokens and give the requests their slots."""
        start = time.perf_counter()
        batch, slots = admission.batch, admission.slots
        assert admission.rows is not None
        try:
            if admission.ready is not None:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(admission.ready)
                for tensor in vars(admission.rows).values():
                    tensor.record_stream(main)  # made on the side stream, read here
            self._install(admission.rows)
            host_ms = _ms_since(start)
            first_tokens = admission.rows.first.tolist()  # the one sync; may raise
        except Exception as exc:
            self._release(slots)
            self._failed_admission([w for w in batch if not w.aborted], exc)
            return
        self._admit_parts["install"] += _ms_since(start)
        self._reserved.difference_update(slots)
        self._release([s for w, s in zip(batch, slots, strict=True) if w.aborted])
        stats = self.stats
        *chunks, text = admission.clocks
        stats.vision_ms += sum(c.ms("start", "vision_end") for c in chunks)
        stats.cross_kv_ms += sum(c.ms("vision_end", "end") for c in chunks)
        stats.text_prefill_ms += text.ms("start", "end")
        stats.admission_host_ms += admission.host_ms + host_ms
        for waiting, slot, token in zip(batch, slots, first_tokens, strict=True):
            if waiting.aborted:
                continue
            running = _Running(waiting.key, waiting.request, waiting.prepared.prompt_tokens, [])
            self._slots[slot] = running
            stats.admitted += 1
            done = self._append(slot, running, token)
            if done is not None:
                with self._lock:
                    self._returned.append(done)

    def _release(self, slots: list[int]) -> None:
        """Give back reserved slots whose admission will not complete."""
        for slot in slots:
            self._reserved.discard(slot)
            self._resident[slot] = None
            self.cache.release(slot)

    def _allocate(self, batch: list[_Waiting]) -> list[int]:
        """A free slot per request: one that already holds its image if any, else the lowest."""
        free = [i for i, slot in enumerate(self._slots) if slot is None and i not in self._reserved]
        chosen = []
        for waiting in batch:
            holding = [i for i in free if self._resident[i] == waiting.prepared.image_key]
            slot = holding[0] if holding else free[0]
            free.remove(slot)
            chosen.append(slot)
        return chosen

    def _reuse_cross_kv(self, batch: list[_Waiting], slots: list[int]) -> list[ImageJob]:
        """Give each slot its image's cross K/V where they are resident (in place, or copied
        from another slot on the current stream); return the images still to encode."""
        taken = set(slots)
        groups: dict[str, list[int]] = {}
        prepared_of = {}
        for waiting, slot in zip(batch, slots, strict=True):
            groups.setdefault(waiting.prepared.image_key, []).append(slot)
            prepared_of[waiting.prepared.image_key] = waiting.prepared
        jobs = []
        for key, group in groups.items():
            source = next((s for s in group if self._resident[s] == key), None)
            if source is None:
                # A slot being reallocated in this batch may be overwritten: not a source.
                source = next(
                    (s for s, k in enumerate(self._resident) if k == key and s not in taken), None
                )
            if source is None:
                jobs.append(ImageJob(prepared_of[key], tuple(group)))
                for slot in group:
                    self._resident[slot] = key
                continue
            for slot in group:
                if slot != source:
                    self.cache.copy_cross(source, slot)
                self._resident[slot] = key
            self.stats.images_reused += len(group)
        self.stats.images_encoded += len(jobs)
        self.stats.images_reused += sum(len(job.slots) - 1 for job in jobs)
        return jobs

    def _unseen(self, prepared: PreparedRequest) -> torch.Tensor:
        """The tiles a prompt token that sees no tile attends to (see ``cross_masks``)."""
        if self.images.skip_padding_tiles:
            return prepared.aspect_ratio_mask.to(torch.bool)
        return torch.ones_like(prepared.aspect_ratio_mask, dtype=torch.bool)

    def _launch_prefill(self, batch: list[_Waiting], slots: list[int]) -> _NewRows:
        """Prefill the prompts into their slots' K/V and sample their first tokens (not
        synced); the decode state to install once they join the decode batch."""
        device = self.device
        slot_index = to_device(torch.tensor(slots), device)
        unseen = torch.stack([self._unseen(w.prepared) for w in batch])
        logits = self._prefill.run(
            slots,
            [w.prepared.input_ids for w in batch],
            [w.prepared.cross_rows for w in batch],
            unseen,
        )
        requests = [w.request for w in batch]
        greedy = to_device(torch.tensor([r.temperature == 0 for r in requests]), device)
        temperature = to_device(torch.tensor([float(r.temperature) for r in requests]), device)
        top_p = to_device(torch.tensor([float(r.top_p) for r in requests]), device)
        first = sample(
            logits,
            greedy,
            temperature,
            top_p,
            any_sampling=not bool(all(r.temperature == 0 for r in requests)),
            any_top_p=any(r.temperature != 0 and r.top_p < 1.0 for r in requests),
        )
        # Decode rows see what the last prompt token saw (HF repeats the last mask row).
        last_rows = torch.stack([w.prepared.cross_rows[-1] for w in batch])
        num_patches = self.parts.geometry.num_patches
        cross_length = visible_tiles(last_rows, unseen).sum(-1, dtype=torch.int32) * num_patches
        cross_mask, row_gate = cross_masks(
            to_device(last_rows, device), to_device(unseen, device), num_patches, self.parts.dtype
        )
        positions = to_device(torch.tensor([w.prepared.prompt_tokens for w in batch]), device)
        return _NewRows(
            slot_index,
            first,
            positions,
            cross_mask,
            to_device(cross_length, device),
            row_gate,
            greedy,
            temperature,
            top_p,
        )

    def _install(self, rows: _NewRows) -> None:
        cache, index = self.cache, rows.slots
        cache.cross_mask[index] = rows.cross_mask
        cache.cross_length[index] = rows.cross_length
        cache.row_gate[index] = rows.row_gate
        cache.tokens[index] = rows.first
        cache.positions[index] = rows.positions
        cache.active.index_fill_(0, index, 1)  # ``[index] = 1`` would copy 1 over, in sync
        cache.greedy[index] = rows.greedy
        cache.temperature[index] = rows.temperature
        cache.top_p[index] = rows.top_p

    # -- decode -----------------------------------------------------------------------------

    def _decode(self) -> list[FinishedRequest]:
        """Launch a step for the live rows, then read back the step launched before it (EOS is
        seen a step late: a row that ended runs one more step, whose token is dropped)."""
        start = time.perf_counter()
        previous, self._launched = self._launched, self._launch()
        finished = self._read(previous) if previous is not None else []
        end = time.perf_counter()
        stats = self.stats
        stats.decode_steps += 1
        stats.decode_ms += (end - start) * 1000.0
        if self._last_decode is not None:
            gap_ms = (end - self._last_decode) * 1000.0
            if gap_ms > stats.longest_decode_gap_ms:
                stats.longest_decode_gap_ms = gap_ms
                stats.longest_gap_admit_ms = self._admit_ms
                stats.longest_gap_admit_parts = dict(self._admit_parts)
                stats.longest_gap_read_ms = self._read_ms
                stats.longest_gap_gc_ms = COLLECTOR_CLOCK.total_ms - self._collected_ms
        self._last_decode = end if self.active else None
        self._collected_ms = COLLECTOR_CLOCK.total_ms
        self._read_ms = 0.0
        return finished

    def _launch(self) -> _Launched:
        """Queue one decode step for every live row, its sampling and the copy of its tokens
        to the host; no sync."""
        cache = self.cache
        live = [(i, slot) for i, slot in enumerate(self._slots) if slot is not None]
        rows = live[-1][0] + 1
        length = max(slot.position for _, slot in live) + 1
        logits = self._graphs.run(rows, length)
        bucket = logits.shape[0]
        requests = [slot.request for _, slot in live]
        tokens = sample(
            logits,
            cache.greedy[:bucket],
            cache.temperature[:bucket],
            cache.top_p[:bucket],
            any_sampling=any(r.temperature != 0 for r in requests),
            any_top_p=any(r.temperature != 0 and r.top_p < 1.0 for r in requests),
        )
        cache.tokens[:bucket].copy_(tokens)
        cache.positions[:bucket] += cache.active[:bucket]
        for _, running in live:
            running.pending += 1
        # Two host buffers in turn: one is read while the next step's copy fills the other.
        host = self._host_tokens[self.stats.decode_steps % 2][:rows]
        host.copy_(tokens[:rows], non_blocking=self.device.type == "cuda")
        copied = None
        if self.device.type == "cuda":
            copied = torch.cuda.Event()
            copied.record()
        return _Launched(live, host, copied)

    def _read(self, launched: _Launched) -> list[FinishedRequest]:
        """Take a launched step's tokens: each row still held by the request it ran for gets
        its token; the others (ended, aborted) are dropped."""
        start = time.perf_counter()
        if launched.copied is not None:
            launched.copied.synchronize()
        tokens = launched.tokens.tolist()
        self._read_ms += _ms_since(start)
        finished = []
        for index, running in launched.rows:
            running.pending -= 1
            if self._slots[index] is not running:
                continue
            done = self._append(index, running, tokens[index])
            if done is not None:
                finished.append(done)
        return finished

    def _append(self, slot: int, running: _Running, token: int) -> FinishedRequest | None:
        """Record a generated token; free the slot and return the request if it is done."""
        running.tokens.append(token)
        self.stats.tokens += 1
        if token not in self.eos_token_ids and len(running.tokens) < running.request.max_new_tokens:
            return None
        self._slots[slot] = None
        self.cache.release(slot)
        return FinishedRequest(running.key, running.tokens, running.prompt_tokens)

    def _compact(self) -> list[FinishedRequest]:
        """Move the highest running slots into lower free ones while that shrinks the decode
        bucket: rows are slots, so holes below the highest running slot cost compute. A move
        first reads back the step in flight (its rows are known by slot); returns what that
        finished."""
        buckets = self._graphs.rows
        finished: list[FinishedRequest] = []
        while True:
            live = [i for i, slot in enumerate(self._slots) if slot is not None]
            held = len(live) + len(self._reserved)
            if not live or pick(buckets, live[-1] + 1) <= pick(buckets, held):
                return finished
            if self._launched is not None:
                launched, self._launched = self._launched, None
                finished += self._read(launched)
                continue
            src = live[-1]
            dst = next(
                i for i, slot in enumerate(self._slots) if slot is None and i not in self._reserved
            )
            running = self._slots[src]
            self.cache.move(src, dst, running.position)
            self._slots[dst], self._slots[src] = running, None
            self._resident[dst] = self._resident[src]


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _record(stream: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """An event marking what ``stream`` has queued so far (None without a stream)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event
