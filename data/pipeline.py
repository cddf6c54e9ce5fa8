"""Training batches from WebDataset shards, split by rank and worker, shuffled by (seed, epoch), resumable exactly.

Shards are read with stock `webdataset` (one shard at a time); samples become processor samples
(media bytes + conversation, or a caption as in img2dataset / video2dataset layouts), are processed
and batched. Every epoch has one seeded shard order, the same on every rank: rank `r` takes every
`world_size`-th shard of it and its DataLoader worker `w` every `num_streams`-th of those, so ranks and
workers read disjoint shards. Inside a shard, samples go through a seeded shuffle buffer.

Equal batch counts: without packing, every rank yields the same number of batches per epoch (the
smallest rank's sample count from `sizes.json`, in whole batches, spread over its workers), so no rank
waits forever in a collective. The stream runs epoch after epoch, so a step-based run never ends
early on one rank even when bad samples or packing make epochs uneven.

Position of a stream: (epoch, shard index, samples emitted by that shard's shuffle buffer, batches
yielded, skip counts). Resuming re-reads the current shard's tar without decoding up to the position,
replaying the same shuffle.

Bad data never ends a run. Any exception while turning one sample into model inputs (decoding, JSON of
the wrong shape, the processor) skips that sample, counted by reason, with a message naming the shard and
the key. Media sizes are checked from their headers first (`MediaLimits`). A sample that crashed the process
(no exception to catch: a segfault, the OOM killer) is named by the stream's in-flight journal and skipped
after two such crashes in a row (data/crash_journal.py). Tars are read with `tarfile`
(webdataset's `gopen` for URLs) rather than webdataset's own iterator so that damage is located: a corrupt
header mid-shard is skipped over (the members after it are kept; the samples next to it are skipped), a
truncated tar, a gzip CRC or inflate error in a `.tar.gz`, and duplicate keys are reported with the shard and
the byte offset, and where `sizes.json` gives the shard's sample count, the number of samples lost.
"""
from __future__ import annotations

import json
import random
import re
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
import webdataset as wds
from braceexpand import braceexpand

from data.batching import make_batcher
from data.crash_journal import SampleJournal
from data.loader import SkipTally, process_sample
from data.manifest import CAPTION_PROMPTS
from data.media import MediaLimits, decode_media, media_limits

MEDIA_KINDS = {"img": "images", "jpg": "images", "jpeg": "images", "png": "images", "webp": "images",
               "aud": "audios", "wav": "audios", "flac": "audios", "mp3": "audios",
               "vid": "videos", "mp4": "videos", "mkv": "videos", "webm": "videos"}
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# The shuffle buffer also stops growing at this many raw sample bytes per worker: 1000 video samples of a
# few MB each would otherwise hold gigabytes in every worker.
SHUFFLE_BUFFER_BYTES = 256 << 20
BLOCK = tarfile.BLOCKSIZE


class ShardSampleError(ValueError):
    """A shard member group is not a usable sample (no text, JSON of the wrong shape, damaged, duplicate)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return type(self), (str(self), self.reason)


def _is_member_name(name: Any) -> bool:
    """A member suffix such as `img0.png` (img2dataset-style records may hold URLs or paths under these keys)."""
    return isinstance(name, str) and "/" not in name and (
        MEDIA_KINDS.get(name.split(".")[0].rstrip("0123456789")) is not None or MEDIA_KINDS.get(name.split(".")[-1]) is not None)


def _member_order(suffix: str) -> tuple[int, str]:
    """`img10.png` after `img9.png`: the number in a member's first name part, then its name."""
    digits = re.match(r"[a-z_]*(\d*)", suffix.split(".")[0]).group(1)
    return int(digits) if digits else -1, suffix


def to_sample(group: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset member group -> a processor sample (media stay bytes; the processor decodes them).

    Media members are matched to the `<image>` ... markers in the order the `.json` lists them (make_shards
    writes `images: [img0.png, ...]`), else by their index (`img10` after `img9`)."""
    key = group["__key__"]
    if "__problem__" in group:
        reason, message = group["__problem__"]
        raise ShardSampleError(f"sample {key}: {message}", reason)
    record: Any = json.loads(group["json"]) if "json" in group else {}
    if not isinstance(record, dict):
        raise ShardSampleError(f"sample {key}: .json holds a {type(record).__name__} ({json.dumps(record)[:60]}), "
                               f"not an object", "bad_json")
    sample: dict[str, Any] = {"id": key, "images": [], "audios": [], "videos": []}
    members = {kind: [] for kind in ("images", "audios", "videos")}
    for member in sorted((k for k in group if not k.startswith("__") and k not in ("json", "txt")), key=_member_order):
        kind = MEDIA_KINDS.get(member.split(".")[0].rstrip("0123456789")) or MEDIA_KINDS.get(member.split(".")[-1])
        if kind:
            members[kind].append(member)
    for kind, found in members.items():
        listed = record.get(kind)
        if isinstance(listed, list) and listed and all(_is_member_name(m) for m in listed):
            missing = [m for m in listed if m not in group]
            if missing:
                raise ShardSampleError(f"sample {key}: .json lists {', '.join(missing)}, not in the shard",
                                       "missing_member")
            found = listed
        sample[kind] = [group[m] for m in found]
        sample[f"{kind}_members"] = found  # names for messages
    if "conversation" in record:
        sample["conversation"] = record["conversation"]
    else:
        caption = record.get("caption")
        if caption is None and "txt" in group:
            caption = group["txt"].decode("utf-8")
        if caption is not None and not isinstance(caption, str):
            raise ShardSampleError(f"sample {key}: `caption` is a {type(caption).__name__}, not a string", "bad_json")
        if not caption or not caption.strip():
            raise ShardSampleError(f"sample {key}: no .json conversation and no caption", "no_text")
        kind = next((k for k in ("images", "videos", "audios") if sample[k]), None)
        sample["conversation"] = [{"role": "user", "content": CAPTION_PROMPTS[kind] if kind else "Write a sentence."},
                                  {"role": "assistant", "content": caption}]
    return sample


def process_group(group: dict[str, Any], process: Callable[[dict], Any], limits: MediaLimits,
                  skips: SkipTally, journal: SampleJournal | None = None) -> Any | None:
    """The model inputs of one shard sample, or None when it is skipped (counted in `skips`). Any exception
    skips the sample, whatever its type: a sample must never end a run; nor, after two crashes, a process."""
    url, key = str(group.get("__url__", "")), str(group["__key__"])
    shard = shard_name(url)
    return process_sample(lambda: process(decode_media(to_sample(group), limits, f"{shard}/{key}")), url, key,
                          skips, journal, where=shard)


def count_samples(shard: Path) -> int:
    """Samples in a tar shard, from its member headers (no decoding); for shards without a sizes.json."""
    keys = set()
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile():
                    directory, _, name = member.name.rpartition("/")
                    keys.add((directory, name.split(".", 1)[0]))
    except (tarfile.TarError, OSError):
        pass  # a truncated shard counts what it has; reading it later skips and reports the damage
    return len(keys)


def read_sizes(source: str | Path, shards: list[str]) -> list[int] | None:
    """Samples per shard of a local directory: from `sizes.json` (ours), else img2dataset / video2dataset's
    `<shard>_stats.json` (`successes`), else counted from the tar headers. None for remote shards (URLs)."""
    if not is_local(source):
        return None
    sizes_file = Path(source) / "sizes.json"
    try:
        sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{sizes_file} is not valid JSON ({err}); delete it to count samples from the tars") from None
    paths = [Path(s) for s in shards]
    return [int(sizes[p.name]) if p.name in sizes else _tool_stats_size(p) or count_samples(p) for p in paths]


def _tool_stats_size(shard: Path) -> int | None:
    stats = shard.with_name(f"{shard.stem}_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"]) if stats.is_file() else None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # not the layout we know: count the tar instead


def is_local(source: str | Path) -> bool:
    return Path(source).is_dir()


def list_shards(source: str | Path) -> list[str]:
    """The shards of `source`: a local directory's `*.tar` (and `.tar.gz`, `.tgz`) files, sorted, or a brace pattern of shard URLs
    as webdataset opens them (`pipe:aws s3 cp s3://bucket/{00000..00099}.tar -`, `https://.../{0..9}.tar`)."""
    if is_local(source):
        shards = sorted(str(p) for p in Path(source).iterdir() if p.name.endswith(SHARD_SUFFIXES) and p.is_file())
        if not shards:
            raise ValueError(f"{source} has no .tar (or .tar.gz) shards (write them with tools/make_shards.py)")
        return shards
    text = str(source)
    if not (text.startswith("pipe:") or "://" in text or "{" in text):
        raise FileNotFoundError(f"shard directory not found: {source}; write it with `python -m tools.make_shards MANIFEST {source}` (the demo's: `python -m tools.make_demo_data`), or give a brace pattern of shard URLs")
    return list(braceexpand(text))


def shard_name(shard: str) -> str:
    """The file name in a shard path or URL, for messages."""
    return shard.rstrip(" -").split("/")[-1]


class _CountingReader:
    """A read-only stream that counts the bytes read from it (where damage lies, whether the tar ended)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.count = raw, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data


class ShardReader:
    """The groups of one shard through a seeded shuffle buffer, resumable after `emitted` groups.

    Damage does not end the shard silently: groups next to damage carry `__problem__` (to_sample turns it
    into a skip naming the key), and `report()` gives the shard-level problems with byte offsets once the
    shard has been read, with the samples lost when `expected` (the shard's sizes.json count) is known.
    Resuming re-reads the tar from its start (without decoding any media) to replay the same shuffle.
    """

    def __init__(self, path: str | Path, seed: int, shuffle_buffer: int,
                 max_buffer_bytes: int = SHUFFLE_BUFFER_BYTES, expected: int | None = None) -> None:
        self.path, self.seed, self.shuffle_buffer, self.max_buffer_bytes = path, seed, shuffle_buffer, max_buffer_bytes
        self.expected = expected
        self.name = shard_name(str(path))
        self.problems: list[tuple[str, str]] = []  # (reason, where and what) of the damage found
        self.seen = 0  # groups read, kept or not
        self.peak_buffer_bytes = 0

    def _open(self) -> IO[bytes]:
        """The uncompressed tar: a local file, or a URL through webdataset's gopen (`pipe:`, https). A gzip
        shard is inflated into a temporary file first, so a CRC error (found only at its end) is known before
        any of its samples is used."""
        local = Path(self.path).is_file()
        raw = open(self.path, "rb") if local else wds.gopen(str(self.path))
        if not str(self.path).rstrip(" -").endswith((".gz", ".tgz")):
            return raw
        spool = tempfile.TemporaryFile()
        with raw:
            problem = _inflate(raw, spool)
        if problem == "crc":  # wrong bytes somewhere: trust none of them
            self.problems.append(("gzip_crc", f"{self.name}: gzip CRC check failed after {spool.tell()} inflated "
                                              f"bytes: its data is corrupt somewhere, so none of it is used"))
            spool.truncate(0)
        elif problem:  # inflation stopped here: what came before is intact
            self.problems.append(("gzip_damage", f"{self.name}: gzip stream broken at inflated byte {spool.tell()} "
                                                 f"({problem})"))
        spool.seek(0)
        return spool

    def _raw(self) -> Iterator[dict[str, Any]]:
        self.problems, self.seen = [], 0
        counter = _CountingReader(self._open())
        group: dict[str, Any] | None = None
        first_offset: dict[str, int] = {}  # key -> byte offset of its first member (duplicate keys)
        end = 0  # where the next header should start
        after_damage: str | None = None
        last = "the start"  # the last member read whole, to say where damage lies
        try:
            if self.problems and self.problems[-1][0] == "gzip_crc":
                return
            with tarfile.open(fileobj=counter, mode="r|", ignore_zeros=True) as tar:  # skips over bad headers
                for member in tar:
                    if member.offset > end:  # the blocks in between held no valid header
                        after_damage = f"next to corrupt tar data at byte {end} of {self.name}: members may be lost"
                        self.problems.append(("tar_damage", f"{self.name}: {member.offset - end} bytes of corrupt tar "
                                                            f"data at byte {end}, after {last}; reading resumed "
                                                            f"at byte {member.offset}"))
                        if group is not None:
                            group["__suspect__"] = after_damage
                    end = member.offset_data + -(-member.size // BLOCK) * BLOCK
                    key, suffix = _split_member(member.name) if member.isfile() else (None, None)
                    if key is None:
                        continue
                    data = tar.extractfile(member).read()
                    if group is None or key != group["__key__"]:
                        if group is not None:
                            yield self._done(group)
                        group = {"__key__": key, "__url__": str(self.path)}
                        if after_damage:
                            group["__suspect__"], after_damage = after_damage, None
                        if key in first_offset:
                            group["__problem__"] = ("duplicate_key", f"the key appears again at byte {member.offset} "
                                                                     f"of {self.name} (first at byte {first_offset[key]})")
                        first_offset.setdefault(key, member.offset)
                    if suffix in group:
                        group["__problem__"] = ("duplicate_key", f"member .{suffix} twice (again at byte {member.offset} "
                                                                 f"of {self.name})")
                    group[suffix] = data
                    last = f"member {member.name}"
            if group is None and self.seen == 0 and counter.count > 0:
                self.problems.append(("not_a_tar", f"{self.name}: no valid tar header in its {counter.count} bytes"))
            elif counter.count - end < 2 * BLOCK:  # every tar writer ends with two zero blocks
                self.problems.append(("tar_truncated", f"{self.name}: ends at byte {counter.count} without the "
                                                       f"end-of-archive marker (truncated), after {last}"))
                if group is not None:
                    group["__problem__"] = ("tar_truncated", f"the last sample of truncated {self.name}")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            kind = "not_a_tar" if counter.count <= BLOCK and group is None else "tar_truncated"
            self.problems.append((kind, f"{self.name}: unreadable at byte {counter.count}, after {last} "
                                        f"({type(err).__name__}: {err})"))
            if group is not None:
                group["__problem__"] = (kind, f"cut off by the damage at byte {counter.count} of {self.name}")
        if group is not None:
            yield self._done(group)

    def _done(self, group: dict[str, Any]) -> dict[str, Any]:
        """A group next to damage is kept only when its .json lists exactly the media it has (our layout):
        otherwise a lost member could turn it into a different sample (an image caption without its image)."""
        self.seen += 1
        suspect = group.pop("__suspect__", None)
        if suspect and "__problem__" not in group and not _lists_its_members(group):
            group["__problem__"] = ("tar_damage", suspect)
        return group

    def report(self) -> list[tuple[str, str, int]]:
        """(reason, message, samples) of each problem found, once the shard has been read: the samples lost are
        counted from `expected` (sizes.json) when it is known; 1 (the event) otherwise."""
        lost = max(0, self.expected - self.seen) if self.expected is not None else None
        report = []
        for index, (reason, message) in enumerate(self.problems):
            if lost is None:
                report.append((reason, f"{message}; the samples lost are not known (no sizes.json)", 1))
            elif index == len(self.problems) - 1:  # the count covers the whole shard: attach it once
                report.append((reason, f"{message}; {self.seen} of {self.expected} samples (sizes.json) read, "
                                       f"{lost} lost", max(lost, 1)))
            else:
                report.append((reason, message, 0))
        if not self.problems and lost:
            report.append(("samples_missing", f"{self.name}: {self.seen} samples, but sizes.json says "
                                              f"{self.expected}: {lost} lost", lost))
        return report

    def groups(self, emitted: int = 0) -> Iterator[dict[str, Any]]:
        """Groups in shuffled order, without the first `emitted` (already consumed before a restart)."""
        shuffled = self._shuffled() if self.shuffle_buffer > 1 else self._raw()
        for index, group in enumerate(shuffled):
            if index >= emitted:
                yield group

    def _shuffled(self) -> Iterator[dict[str, Any]]:
        rng, buffer, held = random.Random(self.seed), [], 0
        for group in self._raw():
            held += _group_bytes(group)
            self.peak_buffer_bytes = max(self.peak_buffer_bytes, held)
            if len(buffer) < self.shuffle_buffer and held <= self.max_buffer_bytes:
                buffer.append(group)
                continue
            index = rng.randrange(len(buffer)) if buffer else 0
            if buffer:
                buffer[index], group = group, buffer[index]
            held -= _group_bytes(group)
            yield group
        rng.shuffle(buffer)
        yield from buffer


def _inflate(raw: IO[bytes], out: IO[bytes]) -> str | None:
    """gzip `raw` inflated into `out`, every member's CRC and length checked by zlib; None when intact, "crc"
    for a checksum mismatch, else what broke (the output up to there is good)."""
    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    try:
        while chunk := raw.read(1 << 20):
            while chunk:
                out.write(inflater.decompress(chunk))
                chunk = inflater.unused_data
                if inflater.eof and chunk:  # concatenated gzip members
                    inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        out.write(inflater.flush())
    except zlib.error as err:
        return "crc" if "check" in str(err) else f"zlib: {err}"
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None if inflater.eof else "the gzip stream ends early (truncated)"


def _lists_its_members(group: dict[str, Any]) -> bool:
    try:
        record = json.loads(group["json"]) if "json" in group else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(record, dict) or not ("conversation" in record or "caption" in record):
        return False
    listed = {m for kind in ("images", "audios", "videos") if isinstance(record.get(kind), list)
              for m in record[kind] if isinstance(m, str)}
    return listed == {k for k in group if not k.startswith("__") and k not in ("json", "txt")}


def _split_member(name: str) -> tuple[str | None, str | None]:
    """`dir/s001.img0.png` -> (`dir/s001`, `img0.png`), as webdataset's `base_plus_ext` (suffix lower-cased)."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    if not match or match.group(1).split("/")[-1].startswith("."):
        return None, None
    return match.group(1), match.group(2).lower()


def _group_bytes(group: dict[str, Any]) -> int:
    return sum(len(value) for value in group.values() if isinstance(value, bytes))


class ShardStream:
    """Batches over one directory of shards for one rank, epoch after epoch, each worker on its own shards."""

    kind = "shards"

    def __init__(self, source: str | Path, process: Callable[[dict], Any], collate: Callable[[list], Any],
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0,
                 pack_length: int | None = None, pad_id: int = 0, limits: MediaLimits | None = None,
                 journal: SampleJournal | None = None) -> None:
        self.num_streams = 1  # StreamLoader sets one stream per DataLoader worker
        self.limits = limits if limits is not None else media_limits(process)
        self.journal = journal
        self.source = str(source)
        self.shards = list_shards(source)
        if len(self.shards) < world_size:
            raise ValueError(f"{self.source} has {len(self.shards)} shard(s) for {world_size} ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.sizes = read_sizes(source, self.shards)  # None for remote shards: no per-epoch batch budget
        self.process, self.collate, self.batch_size = process, collate, batch_size
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer
        self.pack_length, self.pad_id = pack_length, pad_id

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "shuffle_buffer": self.shuffle_buffer, "packed": self.pack_length is not None}

    def epoch_of(self, position: dict[str, Any]) -> int:
        return position["epoch"]

    # ---- which shards, how many batches ------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.shards), generator=generator).tolist()

    def stream_shards(self, epoch: int, stream: int, rank: int | None = None) -> list[int]:
        rank = self.rank if rank is None else rank
        return self._epoch_order(epoch)[rank::self.world_size][stream::self.num_streams]

    def batch_budget(self, epoch: int, stream: int) -> int | None:
        """Batches stream `stream` yields in `epoch` (None when packing or for remote shards: not known ahead).

        Every rank gets the smallest rank's total; within a rank it is spread so that no stream is asked
        for more than its shards hold and the streams stay as even as possible.
        """
        if self.pack_length is not None or self.sizes is None:
            return None
        caps = [[sum(self.sizes[i] for i in self.stream_shards(epoch, s, r)) // self.batch_size
                 for s in range(self.num_streams)] for r in range(self.world_size)]
        return even_split(min(sum(c) for c in caps), caps[self.rank])[stream]

    def batches_per_epoch(self, epoch: int = 0) -> int | None:
        """This rank's batches in `epoch` over all its workers (None when packing or for remote shards)."""
        budgets = [self.batch_budget(epoch, s) for s in range(self.num_streams)]
        return None if None in budgets else sum(budgets)

    def validate(self) -> None:
        per_rank = len(self.shards) // self.world_size
        if per_rank < self.num_streams:
            raise ValueError(f"{self.source}: {len(self.shards)} shard(s) over {self.world_size} rank(s) leave "
                             f"{per_rank} per rank for {self.num_streams} DataLoader workers; every worker needs a "
                             f"shard: lower data.num_workers or write more, smaller shards")
        if self.batches_per_epoch(0) == 0:
            raise ValueError(f"{self.source}: rank {self.rank} of {self.world_size} gets fewer samples than one "
                             f"batch of {self.batch_size} per worker; lower data.num_workers or batch_size")

    # ---- the stream ------------------------------------------------------------------------------------
    def stream_batches(self, stream: int, position: dict[str, Any] | None) -> Iterator[tuple[Any, dict[str, Any]]]:
        pos = {key: (position or {}).get(key, 0) for key in ("epoch", "shard_index", "emitted", "yielded")}
        skips = SkipTally(position)
        if self.journal is not None:
            self.journal.open(stream)

        def snapshot(**changes: Any) -> dict[str, Any]:
            return {**pos, **skips.state(), **changes}

        empty_epochs = 0
        while True:
            shards, budget = self.stream_shards(pos["epoch"], stream), self.batch_budget(pos["epoch"], stream)
            if budget == 0:  # this epoch's shards hold less than a batch for this worker: the next epoch's may not
                empty_epochs += 1
                if empty_epochs == 100:
                    raise ValueError(f"{self.source}: worker {stream} of rank {self.rank} got less than one batch "
                                     f"of {self.batch_size} in 100 epochs in a row; lower data.num_workers")
                pos.update(epoch=pos["epoch"] + 1, shard_index=0, emitted=0, yielded=0)
                continue
            empty_epochs = 0
            batcher = make_batcher(self.collate, self.batch_size, self.pack_length, self.pad_id)
            fresh_epoch, yielded_before = pos["shard_index"] == 0 and pos["emitted"] == 0, pos["yielded"]
            while pos["shard_index"] < len(shards) and (budget is None or pos["yielded"] < budget):
                path = self.shards[shards[pos["shard_index"]]]
                reader = ShardReader(path, self.seed * 1_000_003 + pos["epoch"] * 10_007 + shards[pos["shard_index"]],
                                     self.shuffle_buffer,
                                     expected=self.sizes[shards[pos["shard_index"]]] if self.sizes else None)
                for group in reader.groups(pos["emitted"]):
                    before = snapshot()
                    pos["emitted"] += 1
                    example = process_group(group, self.process, self.limits, skips, self.journal)
                    if example is None:
                        continue
                    if not batcher.fits(example):  # packing: close the batch; this example starts the next
                        pos["yielded"] += 1
                        yield batcher.flush(), {**before, "yielded": pos["yielded"]}
                    batcher.add(example)
                    if batcher.full:
                        pos["yielded"] += 1
                        yield batcher.flush(), snapshot()
                        if budget is not None and pos["yielded"] == budget:
                            break
                else:
                    for reason, message, lost in reader.report():
                        skips.add(reason, message, lost)
                    pos["shard_index"], pos["emitted"] = pos["shard_index"] + 1, 0
            if budget is None and not batcher.empty:  # the epoch's partial batch (packing, remote shards)
                pos["yielded"] += 1
                yield batcher.flush(), snapshot(epoch=pos["epoch"] + 1, shard_index=0, emitted=0, yielded=0)
            elif fresh_epoch and pos["yielded"] == yielded_before:
                raise ValueError(f"rank {self.rank} worker {stream}: a whole epoch of {len(shards)} shard(s) in "
                                 f"{self.source} gave no batch of {self.batch_size} "
                                 f"({skips}); "
                                 f"lower data.num_workers or batch_size, or check the skip reasons")
            pos.update(epoch=pos["epoch"] + 1, shard_index=0, emitted=0, yielded=0)


def even_split(total: int, caps: list[int]) -> list[int]:
    """`total` spread over slots holding at most `caps[i]` each, as evenly as possible (earlier slots first)."""
    if total > sum(caps):
        raise ValueError(f"cannot place {total} in slots of {caps}")
    level_low, level_high = 0, max(caps, default=0)
    while level_low < level_high:  # the highest level L with sum(min(cap, L)) <= total
        level = (level_low + level_high + 1) // 2
        if sum(min(c, level) for c in caps) <= total:
            level_low = level
        else:
            level_high = level - 1
    shares = [min(c, level_low) for c in caps]
    for i, cap in enumerate(caps):
        if sum(shares) == total:
            break
        if cap > shares[i]:
            shares[i] += 1
    return shares
