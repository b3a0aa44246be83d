"""Per-node times from ONNX Runtime's profiler, matched by node name (``bench(profile=True)``)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnx_dense.errors import DenseError
from onnx_dense.runtime.session import PROVIDERS
from onnx_dense.bench.results import NodeTime

def _profile_nodes(orig_model, dense_model, feeds, names, provider, optimize, threads, runs, orig_graph, dense_graph):
    orig_flops, orig_alias = orig_graph
    dense_flops, dense_alias = dense_graph
    orig_times, orig_ops = _profile(orig_model, feeds, names, provider, optimize, threads, runs, orig_alias)
    dense_times, dense_ops = _profile(dense_model, feeds, None, provider, optimize, threads, runs, dense_alias)
    rows = []
    for node in list(dict.fromkeys([*dense_times, *orig_times])):
        rows.append(
            NodeTime(
                node, dense_ops.get(node) or orig_ops.get(node, "?"), orig_times.get(node), dense_times.get(node),
                orig_flops.get(node), dense_flops.get(node),
            )
        )
    return rows

_FUSABLE = {
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "Tanh", "Add", "Sum", "BatchNormalization", "Mul", "Div",
    "HardSwish", "Identity",
}

def _aliases(proto: onnx.ModelProto, flops: dict[str, int]) -> dict[str, str]:
    """Tensor or node name -> the name of the FLOP-counted node whose output it is, through fusable
    element-wise nodes (ORT names a fused node after its output, e.g. ``<Relu output>_nchwc``)."""
    alias: dict[str, str] = {}
    for i, node in enumerate(proto.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if name in flops:
            alias[name] = name
            for o in node.output:
                alias[o] = name
        elif node.op_type in _FUSABLE:
            sources = [alias[x] for x in node.input if x in alias]
            if sources:
                alias[name] = sources[-1]
                for o in node.output:
                    alias[o] = sources[-1]
    return alias

def _profile(model, feeds, names, provider, optimize, threads, runs, alias) -> tuple[dict[str, float], dict[str, str]]:
    """ms per pass of each node, the fastest of ``runs`` passes after one warm-up (ORT's profiler;
    the fastest is the least disturbed by other work on a shared machine).

    Profiled nodes are named as in the ONNX graph when ``alias`` resolves them (ORT renames
    nodes it fuses or converts to NCHWc after their output tensor); nodes ORT adds (layout
    reorders) keep ORT's name.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="onnx-dense-profile-") as tmp:
        so.profile_file_prefix = str(Path(tmp) / "profile")
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        try:
            session = ort.InferenceSession(source, so, providers=[PROVIDERS[provider]])
            feed = {i.name: feeds[i.name] for i in session.get_inputs()}
            for _ in range(runs + 1):
                session.run(names, feed)
            path = session.end_profiling()
        except Exception as exc:
            raise DenseError(f"onnxruntime profiling failed: {str(exc).strip().splitlines()[0][:300]}") from None
        with open(path) as f:
            events = json.load(f)
    model_runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_run: dict[str, list[float]] = {}
    ops: dict[str, list[str]] = {}
    for r, (start, end) in enumerate(model_runs[1:]):
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or not start <= e["ts"] <= end:
                continue
            node = e["name"][: -len("_kernel_time")]
            for candidate in (node, node.removesuffix("_nchwc")):
                if candidate in alias:
                    node = alias[candidate]
                    break
            op = e.get("args", {}).get("op_name", "?")
            if op not in ops.setdefault(node, []):
                ops[node].append(op)
            times = per_run.setdefault(node, [0.0] * (len(model_runs) - 1))
            times[r] += e["dur"] / 1000
    return {k: float(np.min(v)) for k, v in per_run.items()}, {k: "+".join(v) for k, v in ops.items()}



