"""Write a standard Hugging Face checkpoint folder: sharded safetensors, its index, tokenizer, generation config.

Tensors arrive as a stream of ``(name, tensor)`` pairs and are written shard by shard, so an export
never holds more than one shard of new weights in memory. The folder is written beside its final name and
renamed into place (write_model_folder), under the folder's lock.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
from safetensors.torch import save_file

from ..errors import LoramixError
from .atomic import DiskFullError, atomic_dir, remove_leftovers
from .lock import FolderLock

T = TypeVar("T")

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Tokenizer files a base model folder may carry beside its weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
# transformers 5's name for its generic tokenizer class -> the names both transformers 4 and 5 load
# (transformers 5 keeps it as an alias); llama.cpp's converter pins transformers 4.
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class WrittenWeights:
    """What :func:`write_safetensors` wrote: parameter count, bytes and shard files."""

    num_params: int
    num_bytes: int
    files: tuple[str, ...]


def parse_size(size: int | str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", str(size).upper())
        if not match or match.group(2) not in _SIZE_UNITS:
            raise LoramixError(f"shard size {size!r} is not a size like '5GB', '500MB' or a byte count")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if value <= 0:
        raise LoramixError(f"shard size must be positive, got {size!r}")
    return value


def format_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def check_output_dir(directory: str, *, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless ``overwrite``."""
    if os.path.isfile(directory):
        raise LoramixError(f"output path {directory} is a file, expected a folder")
    if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
        raise LoramixError(f"output folder {directory} is not empty (--overwrite / overwrite=True replaces it)")


def write_model_folder(directory: str, write: Callable[[str], T], *, overwrite: bool, what: str) -> T:
    """Write a checkpoint folder whole or not at all, as one run at a time: hold ``directory``'s lock, call
    ``write(tmp)`` on a temporary folder beside it and rename that into place (replacing the old folder, with
    ``overwrite``). Returns what ``write`` returned; a full disk leaves ``directory`` as it was."""
    directory = os.path.abspath(directory)
    check_output_dir(directory, overwrite=overwrite)
    existed = os.path.isdir(directory)
    with FolderLock(directory, what=what):
        remove_leftovers(directory)  # a killed earlier write's temporary folders
        try:
            return atomic_dir(directory, write, what=what)
        except DiskFullError as e:
            raise e.with_detail(f"{directory} is unchanged" if existed else f"nothing was written to {directory}") \
                from None


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], directory: str, *,
                      max_shard_size: int | str = "5GB") -> WrittenWeights:
    """Write the stream into ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when it exceeds ``max_shard_size``. Names must be unique."""
    limit = parse_size(max_shard_size)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = num_params = num_bytes = 0
    temp_files: list[tuple[str, list[str]]] = []

    def flush() -> None:
        path = os.path.join(directory, f".shard-{len(temp_files):05d}.tmp")
        save_file(shard, path, metadata={"format": "pt"})
        temp_files.append((path, list(shard)))
        shard.clear()

    seen: set[str] = set()
    try:
        for name, tensor in tensors:
            if name in seen:
                raise LoramixError(f"internal error: tensor {name!r} written twice")
            seen.add(name)
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > limit:
                flush()
                shard_bytes = 0
            tensor = tensor.detach().to("cpu").contiguous()
            if any(t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in shard.values()):
                tensor = tensor.clone()  # the same weight under several names (identical experts)
            shard[name] = tensor
            shard_bytes += size
            num_params += tensor.numel()
            num_bytes += size
        if shard or not temp_files:
            flush()
    except BaseException:
        for path, _ in temp_files:
            os.remove(path)
        raise

    if len(temp_files) == 1:
        os.replace(temp_files[0][0], os.path.join(directory, WEIGHTS_NAME))
        return WrittenWeights(num_params, num_bytes, (WEIGHTS_NAME,))
    weight_map, files = {}, []
    for i, (path, names) in enumerate(temp_files, start=1):
        final = f"model-{i:05d}-of-{len(temp_files):05d}.safetensors"
        os.replace(path, os.path.join(directory, final))
        files.append(final)
        weight_map.update(dict.fromkeys(names, final))
    with open(os.path.join(directory, INDEX_NAME), "w", encoding="utf-8") as fh:
        json.dump({"metadata": {"total_size": num_bytes}, "weight_map": weight_map}, fh, indent=2)
        fh.write("\n")
    return WrittenWeights(num_params, num_bytes, tuple(files))


def write_checkpoint(directory: str, tensors: Iterable[tuple[str, torch.Tensor]], config, hf_model, *,
                     tokenizer, max_shard_size: int | str) -> tuple[WrittenWeights, list[str]]:
    """A whole checkpoint into ``directory``: the weights, ``config``, ``hf_model``'s generation config and the
    tokenizer (``tokenizer``, else the files of the base model's folder). Returns the weights and tokenizer files."""
    written = write_safetensors(tensors, directory, max_shard_size=max_shard_size)
    config.save_pretrained(directory)
    write_generation_config(hf_model, directory)
    source = tokenizer if tokenizer is not None else getattr(hf_model.config, "_name_or_path", None)
    return written, write_tokenizer(source, directory)


def write_tokenizer(source, directory: str) -> list[str]:
    """Put a tokenizer into ``directory``; returns the file names written.

    ``source``: a local folder (its tokenizer files are copied as they are), a tokenizer object (saved
    with ``save_pretrained``), or None / a folder without tokenizer files (nothing written). Either way the
    written ``tokenizer_config.json`` declares a class older transformers know (:func:`make_tokenizer_portable`).
    """
    if hasattr(source, "save_pretrained"):
        written = sorted(os.path.basename(path) for path in source.save_pretrained(directory))
    elif source and os.path.isdir(source):
        written = []
        for name in TOKENIZER_FILES:
            path = os.path.join(source, name)
            if os.path.isfile(path):
                shutil.copyfile(path, os.path.join(directory, name))
                written.append(name)
    else:
        return []
    make_tokenizer_portable(directory)
    return written


def make_tokenizer_portable(directory: str) -> None:
    """Replace a transformers-5-only ``tokenizer_class`` in ``directory/tokenizer_config.json`` (e.g.
    ``TokenizersBackend``) by the name transformers 4 and 5 both load (``PreTrainedTokenizerFast``)."""
    path = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    portable = PORTABLE_TOKENIZER_CLASSES.get(config.get("tokenizer_class"))
    if portable is None:
        return
    config["tokenizer_class"] = portable
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def tokenizer_report(files: tuple[str, ...] | list[str]) -> str:
    return "tokenizer files: " + (", ".join(files) or "none (the base has none; pass a tokenizer)")


def write_generation_config(hf_model, directory: str) -> None:
    """The model's generation defaults (eos ids, ...), as transformers' own ``save_pretrained`` writes them."""
    generation_config = getattr(hf_model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
