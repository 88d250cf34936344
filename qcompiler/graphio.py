"""Reading and writing ONNX files: clear errors on bad input, atomic writes, external data."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.errors import ModelLoadError, OutputError, first_line
from qcompiler.external import attach_external, external_info, is_external, read_values

log = logging.getLogger(__name__)


def np_dtype(dtype) -> np.dtype | None:
    """A graphsurgeon tensor's dtype as numpy's: graphsurgeon gives numpy dtypes, or the ONNX enum for types
    numpy lacks (bfloat16, float8...); None where there is no numpy equivalent."""
    if dtype is None:
        return None
    if isinstance(dtype, int):
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        except (KeyError, TypeError, ValueError):
            return None
    try:
        return np.dtype(dtype)
    except TypeError:
        return None

# Above this many initializer bytes a model is written with external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024


def load_onnx(path: str | os.PathLike, load_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file (and its external data, unless ``load_data`` is false: then the tensors keep
    their file references, checked to exist and to lie inside the model's folder). Raises
    ModelLoadError with one readable line."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model not found: {p}")
    if not p.is_file():
        raise ModelLoadError(f"not a file: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelLoadError(f"not a readable ONNX model: {p} ({type(e).__name__})") from None
    if not model.graph.node or not model.opset_import:
        raise ModelLoadError(f"not an ONNX model (no graph nodes or opsets): {p}")
    try:  # structure only (the file's own path: no 2 GiB limit, external data not read twice)
        onnx.checker.check_model(str(p))
    except Exception as e:
        if not _valid_with_ort_ops(model):
            raise ModelLoadError(f"invalid ONNX model {p}: {first_line(e, 200)}") from None
    base = p.parent.resolve()
    for tensor in _external_tensors(model):
        info = external_info(tensor)
        loc = info.get("location", "")
        target = (base / loc).resolve()
        if base not in target.parents and target != base:
            raise ModelLoadError(f"external data of {tensor.name!r} points outside the model folder: {loc}")
        if not target.is_file():
            raise ModelLoadError(f"external data file missing for {tensor.name!r}: {target}")
        length, offset = info.get("length"), int(info.get("offset", 0))
        if length is not None and offset + int(length) > target.stat().st_size:
            raise ModelLoadError(f"external data of {tensor.name!r} is truncated: {loc} ends before byte "
                                 f"{offset + int(length)}")
    if load_data:
        load_external_data(model, p)
    return model


# ops ONNX Runtime registers in the default ONNX domain although ONNX has no such op (onnxruntime-genai's
# model builder writes them there): the checker does not know them, ONNX Runtime runs them
ORT_DEFAULT_DOMAIN_OPS = frozenset({"SimplifiedLayerNormalization"})


def _valid_with_ort_ops(model: onnx.ModelProto) -> bool:
    """True when ``model`` (read without its external data) passes the checker once the ONNX Runtime ops
    it writes in the default domain are read as contrib ops (which the checker does not look into)."""
    if not any(n.op_type in ORT_DEFAULT_DOMAIN_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return False
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for n in copy.graph.node:
        if n.op_type in ORT_DEFAULT_DOMAIN_OPS and n.domain in ("", "ai.onnx"):
            n.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    external = [t for t in copy.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in external:  # the checker of a proto cannot find its files: typed graph inputs stand in for them
        copy.graph.initializer.remove(t)
        copy.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        onnx.checker.check_model(copy)
    except Exception:  # noqa: BLE001 - any other fault: the original error is reported
        return False
    return True


def load_external_data(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Read into ``model`` (loaded from ``path`` without it) its external data."""
    try:
        onnx.load_external_data_for_model(model, str(Path(path).parent.resolve()))
    except Exception as e:
        raise ModelLoadError(f"cannot read external data of {path}: {e}") from None


def external_data_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the tensors ``model`` keeps in external data files."""
    return sum(int(external_info(t).get("length", 0)) for t in _external_tensors(model))


def _external_tensors(model: onnx.ModelProto):
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t


def saved_bytes(path: str | os.PathLike) -> int:
    """An ONNX file's size plus that of the external data files it names."""
    p = Path(path)
    model = onnx.load(str(p), load_external_data=False)
    files = {external_info(t).get("location") for t in _external_tensors(model)}
    return p.stat().st_size + sum((p.parent / f).stat().st_size for f in files if f and (p.parent / f).is_file())


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.HasField("raw_data"):
            total += len(t.raw_data)
        else:
            total += onnx.numpy_helper.to_array(t).nbytes if t.data_location != onnx.TensorProto.EXTERNAL else 0
    return total


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any work, when the output cannot be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise OutputError(f"output is a directory: {p}")
    if not parent.is_dir():
        raise OutputError(f"output folder does not exist: {parent}")
    try:  # a real probe: os.access says yes to root even where writing fails
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"output folder is not writable: {parent} ({e.strerror or e})") from None
    return p


def save_onnx_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` to ``path`` so that readers only ever see a complete file.

    Everything is written into a temporary folder beside the target and renamed into place; large
    models get one external data file ``<name>.data``. On any failure nothing is left behind.
    """
    out = check_writable(path)
    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD
    tmpdir = None
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        tmp_model = tmpdir / out.name
        if external:
            data_name = out.name + ".data"
            onnx.save_model(model, str(tmp_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            os.replace(tmpdir / data_name, out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, out)
    except OSError as e:
        raise OutputError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    log.info("wrote %s (%s)", out, "external data" if external else "single file")
    return out


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike, marker: str) -> Path:
    """Rename the finished folder ``tmp`` to ``final`` (an old ``final`` is replaced). Where another process
    published ``final`` first (two compiles filling one cache at once), its complete folder (holding
    ``marker``) is kept and ``tmp`` is removed: both hold the same content."""
    tmp, final = Path(tmp), Path(final)
    try:
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError:
        if not (final / marker).exists():
            raise
        log.info("%s was written by another process meanwhile; keeping that copy", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it: readers see the old or the new file."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return p


def import_graph(model: onnx.ModelProto, data_dir: str | os.PathLike | None = None) -> gs.Graph:
    """The model as an onnx-graphsurgeon graph. ``data_dir``: the folder of a model loaded without its
    external data; those constants then read their file on every access (``qcompiler.external``)."""
    graph = gs.import_onnx(model)
    if data_dir is not None:
        attach_external(graph, model, data_dir)
    # dead code (nodes no output depends on) is dropped first: the matcher must not plan sites for it
    graph.cleanup(remove_unused_graph_inputs=False)
    if untranspose_tables(graph):
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    # onnx-graphsurgeon keeps (and later appends to) the model's own opset list: detach it
    graph.import_domains = [onnx.helper.make_opsetid(o.domain, o.version) for o in model.opset_import]
    return graph


# an external (streamed) table larger than this keeps its builder layout (float, read through the Transpose):
# turning it holds it in memory
UNTRANSPOSE_MAX_BYTES = 1 << 30


def untranspose_tables(graph: gs.Graph) -> int:
    """``Gather(Transpose(C), ids)`` on axis 0, with ``C`` a 2-D constant (in memory, or external up to
    ``UNTRANSPOSE_MAX_BYTES``) and ``perm`` ``[1, 0]``
    (onnxruntime-genai's builder ties a head so: its MatMul reads ``C`` ``[H, V]``, the table is ``C^T``) becomes
    ``Gather(T, ids)`` with the constant ``T = C^T``, and every other reader of ``C`` reads ``Transpose(T)``: a
    Hugging Face export's tied head, whose table and head the matcher and ``EmbeddingPass`` quantize and share.
    The same function of the inputs; returns how many tables were turned."""
    turned = 0
    for node in list(graph.nodes):
        if node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0 or len(node.inputs[0].inputs) != 1:
            continue
        tr = node.inputs[0]
        flip = tr.inputs[0]
        c = flip.inputs[0] if flip.op == "Transpose" and list(flip.attrs.get("perm", ())) == [1, 0] else None
        if (not isinstance(c, gs.Constant) or c.shape is None or len(c.shape) != 2
                or any(r.op != "Gather" or r.inputs[0] is not tr for r in tr.outputs)):
            continue
        if is_external(c) and int(np.prod(c.shape)) * np.dtype(np_dtype(c.dtype)).itemsize > UNTRANSPOSE_MAX_BYTES:
            continue  # a streamed compile keeps a large table in its file
        values = read_values(c)
        table = gs.Constant(f"{c.name}_table", np.ascontiguousarray(values.T))
        for r in list(tr.outputs):
            r.inputs[0] = table
        if any(r is not flip for r in c.outputs):
            back = gs.Variable(f"{c.name}_from_table", dtype=values.dtype, shape=list(values.shape))
            graph.nodes.append(gs.Node("Transpose", name=f"{flip.name}_of_table", attrs={"perm": [1, 0]},
                                       inputs=[table], outputs=[back]))
            redirect_consumers(c, back)
        turned += 1
    return turned


def share_constants(graph: gs.Graph, keep: list[gs.Constant]) -> int:
    """Make the readers of any other in-memory constant equal to one of ``keep`` (same dtype, shape and bytes)
    read that one instead, so the file stores it once (a tied head's MatMulNBits codes, equal to the codes its
    table's GatherBlockQuantized reads). Returns how many copies were dropped."""
    if not keep:
        return 0
    wanted = {(k.values.dtype.str, k.values.shape): k for k in keep}
    dropped = 0
    for t in graph.tensors().values():
        # ``_values``: reading ``values`` would load a lazy (int4, external) tensor, and int4 then exports wrongly
        if not isinstance(t, gs.Constant) or not isinstance(t._values, np.ndarray) or any(t is k for k in keep):
            continue
        k = wanted.get((t._values.dtype.str, t._values.shape))
        if k is not None and np.array_equal(k.values, t._values):
            redirect_consumers(t, k)
            dropped += 1
    return dropped


def redirect_consumers(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` instead."""
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def export_graph(graph: gs.Graph) -> onnx.ModelProto:
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return gs.export_onnx(graph, do_type_check=False)
