"""A CPU checkpoint engine: the actor's weights to a rollout pool apart from it, over a gloo group.

Written against verl 0.9.1's ``verl.checkpoint_engine.base.CheckpointEngine``. verl's trainers that run the
rollout apart from the actor (v1 ``separate_async``, ``verl.experimental.one_step_off_policy`` and
``fully_async_policy``) move the weights with a checkpoint engine other than ``naive``; without CUDA verl
registers none (nccl and delta_sharded need cupy, hccl an Ascend NPU, nixl/mooncake/kimi their packages).
This one is registered as :data:`BACKEND` when verl imports the module named in
``actor_rollout_ref.rollout.checkpoint_engine.custom_backend_module`` (verl's extension point, imported in the
actor workers, the rollout's checkpoint workers and the driver's ``CheckpointEngineManager``), which only the
tiny CPU recipe sets: a GPU run never loads it.

One transfer is the shape of verl's NCCL engine, without its double buffering and relays: actor rank 0 sends,
the other actor ranks walk their weight generator (producing a full tensor is collective over the actor
group) and send nothing, every rollout worker receives. verl's manager calls ``prepare`` -> ``build_topology``
-> ``init_process_group`` -> ``send_weights``/``receive_weights`` -> ``finalize`` for every update, so each
update gets a fresh group on a fresh store: nothing of one update can leak into the next. A bucket travels as
three broadcasts: its length and its metadata's length, the pickled metadata (verl's ``TensorMeta`` per
chunk), the bytes. Chunking and reassembly are verl's own ``split_weight_chunks``/``merge_weight_chunks``.
"""

from __future__ import annotations

import asyncio
import datetime
import pickle
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist
from verl.checkpoint_engine.base import (
    CheckpointEngine,
    CheckpointEngineRegistry,
    TensorMeta,
    merge_weight_chunks,
    split_weight_chunks,
)

BACKEND = "cpu_gloo"
SENDER = 0  # the group rank of actor rank 0
NOT_IN_GROUP = -1  # the group rank given to the other actor ranks
# Each chunk starts at a multiple of this in its bucket: verl's merge views a chunk of bytes as the weight's dtype,
# which needs an offset the dtype's size divides (a bf16 weight of odd length would misalign the next fp32 one).
ALIGNMENT = 16


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class StoreAddress:
    """Where the sender's TCPStore listens; `prepare` of actor rank 0 reports it, `build_topology` hands it out."""

    host: str
    port: int


@CheckpointEngineRegistry.register(BACKEND)
class GlooCheckpointEngine(CheckpointEngine):
    """verl's checkpoint-engine contract over a gloo process group of its own (CPU tensors).

    Args:
        bucket_size: Most bytes per broadcast (verl passes
            ``checkpoint_engine.update_weights_bucket_megabytes`` << 20); weights larger than a bucket travel in
            chunks.
        is_master: True on actor rank 0 (verl's actor worker sets it), which owns the store and sends.
        timeout_s: How long a rank waits for the others in the store and in each broadcast
            (``checkpoint_engine.engine_kwargs.cpu_gloo.timeout_s``); a peer that died ends the update with an
            error instead of a hang.
    """

    def __init__(self, bucket_size: int, is_master: bool = False, timeout_s: float = 600.0) -> None:
        if bucket_size <= 0:
            raise ValueError(f"bucket_size must be positive, got {bucket_size}")
        self.bucket_size = bucket_size
        self.is_master = is_master
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.rank: int | None = None
        self._store: dist.TCPStore | None = None
        self._group: dist.ProcessGroupGloo | None = None

    def prepare(self) -> StoreAddress | None:
        """Open the sender's store (actor rank 0) for this update.

        Returns:
            The store's address on actor rank 0, None on every other worker.
        """
        if not self.is_master:
            return None
        host = ray.util.get_node_ip_address().strip("[]")
        # Port 0: the store binds a free port itself, so two runs on one node never race for one.
        self._store = dist.TCPStore(host, 0, None, True, timeout=self.timeout, wait_for_workers=False)
        return StoreAddress(host=host, port=self._store.port)

    @classmethod
    def build_topology(
        cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[StoreAddress | None]
    ) -> tuple[dict[str, list], dict[str, list]]:
        """Place actor rank 0 at group rank 0 and the rollout workers after it.

        Args:
            actor_wg_world_size: Number of actor workers (their metadata come first).
            rollout_world_size: Number of rollout workers.
            metadata: What `prepare` returned, actor workers first.

        Returns:
            ``init_process_group`` arguments per actor worker and per rollout worker.
        """
        address = metadata[0]
        if not isinstance(address, StoreAddress):
            raise ValueError(f"actor rank 0 must report the store's address from prepare(); got {address!r}")
        world_size = 1 + rollout_world_size
        actor_kwargs = {
            "rank": [SENDER] + [NOT_IN_GROUP] * (actor_wg_world_size - 1),
            "world_size": [world_size] * actor_wg_world_size,
            "address": [address] * actor_wg_world_size,
        }
        rollout_kwargs = {
            "rank": list(range(1, world_size)),
            "world_size": [world_size] * rollout_world_size,
            "address": [address] * rollout_world_size,
        }
        return actor_kwargs, rollout_kwargs

    def init_process_group(self, rank: int, world_size: int, address: StoreAddress) -> None:
        """Join this update's group (every rank but the other actor ranks).

        Args:
            rank: Group rank from `build_topology` (:data:`NOT_IN_GROUP` for actor ranks other than 0).
            world_size: 1 + the number of rollout workers.
            address: The sender's store.
        """
        self.rank = rank
        if rank == NOT_IN_GROUP:
            return
        if (rank == SENDER) != self.is_master:
            raise ValueError(f"group rank {rank} given to a worker with is_master={self.is_master}")
        if self._store is None:
            self._store = dist.TCPStore(address.host, address.port, None, False, timeout=self.timeout)
        self._group = dist.ProcessGroupGloo(self._store, rank, world_size, self.timeout)

    def finalize(self) -> None:
        """Drop this update's group and store (the next update builds new ones)."""
        self._group = None
        self._store = None
        self.rank = None

    def _broadcast(self, tensor: torch.Tensor) -> None:
        self._group.broadcast(tensor, SENDER).wait()

    def _broadcast_bucket(self, bucket_meta: dict[str, TensorMeta], payload: torch.Tensor, is_last: bool) -> None:
        meta = torch.frombuffer(
            bytearray(pickle.dumps({"bucket_meta": bucket_meta, "is_last": is_last})), dtype=torch.uint8
        )
        self._broadcast(torch.tensor([payload.numel(), meta.numel()], dtype=torch.int64))
        self._broadcast(meta)
        self._broadcast(payload)

    def _receive_bucket(self) -> tuple[dict, torch.Tensor]:
        lengths = torch.empty(2, dtype=torch.int64)
        self._broadcast(lengths)
        payload_length, meta_length = lengths.tolist()
        meta = torch.empty(meta_length, dtype=torch.uint8)
        self._broadcast(meta)
        # A new tensor per bucket: the reassembled weights are views of it, read after the next receive starts.
        payload = torch.empty(payload_length, dtype=torch.uint8)
        self._broadcast(payload)
        return pickle.loads(meta.numpy().tobytes()), payload

    @torch.no_grad()
    async def send_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None],
        global_steps: int | None = None,
    ) -> None:
        """Broadcast the weights from actor rank 0; the other actor ranks only produce theirs.

        Args:
            weights: The actor's ``(name, full tensor)`` generator.
            global_steps: Unused (the receiving server adapter is given the step by verl's worker).
        """
        if self.rank is None:
            raise RuntimeError("send_weights before init_process_group")
        if self.rank == NOT_IN_GROUP:
            async for _ in split_weight_chunks(weights, self.bucket_size, meta_only=True):
                pass
            return
        if self.rank != SENDER:
            raise RuntimeError(f"group rank {self.rank} is a receiver; only actor rank 0 sends")
        bucket_meta: dict[str, TensorMeta] = {}
        chunks: list[torch.Tensor] = []
        offset = 0
        async for tensor_meta, chunk in split_weight_chunks(weights, self.bucket_size):
            if _aligned(offset) + tensor_meta.chunk_size > self.bucket_size:
                await asyncio.to_thread(self._broadcast_bucket, bucket_meta, torch.cat(chunks), False)
                bucket_meta, chunks, offset = {}, [], 0
            if offset != _aligned(offset):
                chunks.append(torch.zeros(_aligned(offset) - offset, dtype=torch.uint8))
                offset = _aligned(offset)
            tensor_meta.offset = offset
            bucket_meta[tensor_meta.name] = tensor_meta
            chunks.append(chunk.detach().to("cpu").contiguous())
            offset += tensor_meta.chunk_size
        payload = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
        await asyncio.to_thread(self._broadcast_bucket, bucket_meta, payload, True)

    @torch.no_grad()
    async def receive_weights(self, global_steps: int | None = None) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        """Receive the weights on a rollout worker.

        Args:
            global_steps: Unused.

        Yields:
            ``(name, tensor)`` in the sender's order, each tensor whole.
        """
        if self.rank is None or self.rank <= SENDER:
            raise RuntimeError(f"receive_weights on group rank {self.rank}: only rollout workers receive")
        async for name, weight in merge_weight_chunks(self._receive_chunks(), self.bucket_size):
            yield name, weight

    async def _receive_chunks(self) -> AsyncGenerator[tuple[TensorMeta, torch.Tensor], None]:
        is_last = False
        while not is_last:
            meta, payload = await asyncio.to_thread(self._receive_bucket)
            is_last = meta["is_last"]
            for tensor_meta in meta["bucket_meta"].values():
                yield tensor_meta, payload[tensor_meta.offset : tensor_meta.offset + tensor_meta.chunk_size]
