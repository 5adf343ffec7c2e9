"""Writing the pixels-to-classes graph as an ONNX file and opening one with onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from seg.runtime.errors import SegError

EXTRA_HINT = "ONNX export needs the export extra: pip install 'seg[export]' (onnx, onnxscript, onnxruntime)"
DEFAULT_OPSET = 18


def require_onnx() -> None:
    """One line, not an ImportError, when the optional libraries are missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise SegError(f"{EXTRA_HINT}; missing: {exc.name}") from None


def write_onnx(graph: nn.Module, example: Tensor, path: Path, opset: int = DEFAULT_OPSET,
               metadata: dict[str, str] | None = None, dynamic_size: bool = False) -> None:
    """Export `graph` (uint8 image [N, H, W, 3] -> labels, logits) to `path` with N dynamic, then check
    the file with onnx's checker. `example` must hold at least 2 images: torch.export treats a size of
    1 as a constant and the batch would lose its dynamic dimension. `metadata` goes into the file's
    metadata_props (what a runtime can read without seg: the class names and colours). With
    `dynamic_size` the image's height and width are dynamic too (from 2 x 2 pixels on)."""
    import onnx

    if example.shape[0] < 2:
        raise ValueError("the example batch needs 2 or more images to keep the batch dimension dynamic")
    batch = torch.export.Dim("batch", min=1, max=1024)
    dims = {0: batch}
    if dynamic_size:
        dims.update({1: torch.export.Dim("height", min=2, max=16384), 2: torch.export.Dim("width", min=2, max=16384)})
    # The exporter narrates every pass on stdout/stderr and warns about lru_cache'd helpers it traces
    # through; a user needs only the result, and failures still raise.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_loggers():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset,
                                        input_names=["image"], output_names=["labels", "logits"],
                                        dynamic_shapes={"image": dims}, verbose=False)
        except Exception as exc:  # the exporter's own errors are long; the first line says what failed
            first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise SegError(f"the graph could not be exported to ONNX opset {opset}: {first[:300]}") from None
        program.model.metadata_props.update(metadata or {})
        program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


@contextlib.contextmanager
def _quiet_loggers():
    names = ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript", "onnx_ir")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def open_session(path: Path, threads: int = 0):
    """An onnxruntime CPU session on the file (threads=0: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
