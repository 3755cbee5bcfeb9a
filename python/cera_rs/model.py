"""``CeraModel`` and ``get_cera_model``: the user-facing wrapper, a ``peft.PeftModel``.

Everything PEFT users call (``print_trainable_parameters``, ``save_pretrained``,
``from_pretrained``, ``load_adapter``, ``add_adapter``, ``set_adapter``,
``disable_adapter()``, ``unload``, ``generate`` pass-through) is PEFT's. What this adds:
saving that a crash cannot half-write, loading that checks its files before PEFT
would reach for a model hub, and a clear refusal of ``merge_and_unload``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peft import PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from peft.utils.constants import CONFIG_NAME
from safetensors import SafetensorError, safe_open
from torch import nn

from cera_rs.config import PEFT_TYPE, CeraConfig


class CeraModel(PeftModel):
    """A model with CeRA adapters; behaves as PEFT's ``PeftModel`` does."""

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """PEFT's save, written to a temporary folder beside ``save_directory`` and moved
        into place file by file (``os.replace``): a failed write leaves the old files
        intact, and a failure while moving puts back the files already replaced."""
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            super().save_pretrained(staging, **kwargs)
            # Weights before config: a reader never sees a new config with old weights.
            files = sorted(p for p in staging.rglob("*") if p.is_file())
            files.sort(key=lambda p: p.name == CONFIG_NAME)
            _replace_all(staging, files, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> CeraModel:
        """Wraps ``model`` and loads the adapter saved in the folder ``model_id``."""
        header = check_adapter_files(model_id)
        check_float_weights(model_id, header)
        config = read_config(model_id)
        check_rank(model_id, config, header)
        config.inference_mode = not is_trainable
        wrapped = cls(model, config, adapter_name)
        wrapped._load_weights(model_id, adapter_name, is_trainable, **kwargs)
        return wrapped

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
        **kwargs: Any,
    ) -> Any:  # fmt: skip
        """Loads a saved CeRA adapter under ``adapter_name``; refuses incomplete files."""
        header = check_adapter_files(model_id)
        check_float_weights(model_id, header)
        if adapter_name not in self.peft_config:
            config = read_config(model_id)
            check_rank(model_id, config, header)
            config.inference_mode = not is_trainable
            self.add_adapter(adapter_name, config)
        return self._load_weights(model_id, adapter_name, is_trainable, **kwargs)

    def _load_weights(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool, **kwargs: Any
    ) -> Any:
        """PEFT's load of already checked files into the existing adapter ``adapter_name``."""
        try:
            result = super().load_adapter(
                str(model_id), adapter_name, is_trainable=is_trainable, **kwargs
            )
        except RuntimeError as err:  # load_state_dict's size mismatch
            raise ValueError(f"adapter weights in {model_id} do not fit the model: {err}") from None
        except KeyError as err:  # PEFT looks up modules_to_save weights the file lacks
            raise ValueError(
                f"{Path(model_id) / SAFETENSORS_WEIGHTS_NAME} lacks {err}, which its "
                f"{CONFIG_NAME} asks for (modules_to_save)"
            ) from None
        missing = [k for k in result.missing_keys if ".cera_" in k and f".{adapter_name}." in k]
        if missing:
            raise ValueError(
                f"{Path(model_id) / SAFETENSORS_WEIGHTS_NAME} lacks weights for "
                f"{len(missing)} adapter tensors, e.g. {missing[0]}"
            )
        return result


def _replace_all(staging: Path, files: list[Path], target: Path) -> None:
    """Moves ``files`` (under ``staging``) to the same paths under ``target``, all or
    none: the previous version of each file is kept (as a hard link, or a copy) in
    ``staging`` until every move succeeded, and restored if one fails."""
    previous = staging / ".previous"
    done: list[tuple[Path, Path | None]] = []
    try:
        for file in files:
            relative = file.relative_to(staging)
            dest = target / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            backup = None
            if dest.is_file():
                backup = previous / relative
                backup.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(dest, backup)
                except OSError:
                    shutil.copy2(dest, backup)
            os.replace(file, dest)
            done.append((dest, backup))
    except BaseException:
        for dest, backup in reversed(done):
            if backup is None:
                dest.unlink(missing_ok=True)
            else:
                os.replace(backup, dest)
        raise


def check_adapter_files(model_id: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
    """A local adapter folder with a readable config and safetensors file, or an error
    naming what is missing or broken (PEFT would otherwise try to download it).
    Returns the dtype and shape of each tensor in the safetensors file (its header)."""
    folder = Path(model_id)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"adapter folder {folder} has no {name}")
    weights = folder / SAFETENSORS_WEIGHTS_NAME
    try:
        with safe_open(weights, framework="pt") as f:
            header = {}
            for key in f.keys():
                tensor = f.get_slice(key)
                header[key] = (tensor.get_dtype(), list(tensor.get_shape()))
            return header
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is not a valid safetensors file: {err}") from None


def check_rank(
    model_id: str | os.PathLike, config: CeraConfig, header: dict[str, tuple[str, list[int]]]
) -> None:
    """Compares the config's rank with the saved A (r, d_in) and B (d_out, r) before
    any adapter is allocated: a corrupted r must not allocate r x d_in weights."""
    ranks = {key: shape[0] if ".cera_A." in key else shape[-1]
             for key, (_, shape) in header.items()
             if (".cera_A." in key or ".cera_B." in key) and len(shape) == 2}  # fmt: skip
    if not ranks:
        raise ValueError(
            f"{Path(model_id) / SAFETENSORS_WEIGHTS_NAME} holds no CeRA adapter weights "
            "(2-D tensors named *.cera_A.* / *.cera_B.*)"
        )
    wrong = {key: r for key, r in ranks.items() if r != config.r}
    if wrong:
        key, r = next(iter(wrong.items()))
        raise ValueError(
            f"{Path(model_id) / CONFIG_NAME} says r={config.r}, but "
            f"{Path(model_id) / SAFETENSORS_WEIGHTS_NAME} holds rank-{r} weights ({key})"
        )


def check_float_weights(
    model_id: str | os.PathLike, header: dict[str, tuple[str, list[int]]]
) -> None:
    """Refuses adapter tensors that are not floating point (load_state_dict would
    silently cast integers or booleans into the weights)."""
    for key, (dtype, _) in header.items():
        if (".cera_A." in key or ".cera_B." in key) and dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{Path(model_id) / SAFETENSORS_WEIGHTS_NAME} holds {dtype} adapter weights "
                f"({key}); CeRA weights are floating point"
            )


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def read_config(model_id: str | os.PathLike) -> CeraConfig:
    """The ``CeraConfig`` in ``model_id/adapter_config.json``, with the file named on error."""
    path = Path(model_id) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"adapter folder {model_id} has no {CONFIG_NAME}")
    try:
        raw = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, absurd nesting
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    # PEFT picks the config class from peft_type: another method's file would
    # otherwise build that method's adapters (or fail with a KeyError).
    if raw.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
        raise ValueError(
            f"{path} describes a {raw['peft_type']!r} adapter, not a CeRA one "
            f"(peft_type {PEFT_TYPE!r})"
        )
    try:
        return CeraConfig.from_pretrained(str(model_id))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    except TypeError as err:
        raise TypeError(f"{path}: {err}") from None


def get_cera_model(
    model: nn.Module, config: CeraConfig, adapter_name: str = "default"
) -> CeraModel:
    """Adds CeRA adapters to ``model`` as ``peft.get_peft_model`` adds LoRA ones."""
    if not isinstance(config, CeraConfig):
        raise TypeError(f"get_cera_model needs a CeraConfig, got {type(config).__name__}")
    return CeraModel(model, config, adapter_name)
