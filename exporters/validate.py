"""Validate an export: run the ONNX model and the torch model it came from on real sentences.

:func:`validate_export` encodes :data:`SENTENCES` (short movie-review sentences of different
lengths, so padding is exercised) with the model's own tokenizer, runs

- the torch model rebuilt from the ``model.pt`` dict (:func:`qbert_edge.checkpoint.from_checkpoint`,
  or the fp32 model for a baseline export), and
- the ONNX model: a portable graph with the reference backend (``onnx.reference`` + the NumPy
  kernels, :mod:`qbert_edge.runtime.reference`); an ``ort`` graph with onnxruntime (CPU), the
  runtime it is written for,

and compares every output, sentence by sentence. It passes when, for each output and sentence,
``max|onnx - torch| <= atol + rtol * max|torch|`` (:data:`ATOL`, :data:`RTOL`) and, for
``logits``, every sentence gets the same class. The weights are bit-identical on both sides
(``(code - zero) * scale`` in fp32), so what differs is fp32 summation order: ~1e-6 relative.

With 8-bit activations one more thing can differ: an input that lands within that 1e-6 of a
rounding boundary of ``QuantizeLinear`` moves by one activation step on one side only, and a
low-bit model (a 2-bit DirectQ MiniLM, measured) can amplify that one step to a 14% (relative L2) change of the
sentence's output. That is not an export error, so when some sentences are past the tolerance:

1. each such sentence's activation codes are compared layer by layer (the ONNX ``QuantizeLinear``
   outputs against ``clamp(rint(x / scale) + zero)`` of the torch input ``x``); at the first layer
   where they differ, every differing code must be one step apart with ``x / scale`` within
   :data:`FLIP_MARGIN` of a rounding tie (a "flip"), else it is a "mismatch" (a wrong scale, zero
   point or graph moves codes by more, or away from ties);
2. the whole comparison is repeated with activation quantization removed on both sides (the Q/DQ
   pairs dropped from the graph, the torch observers off), and every sentence must then agree.

3. independently of 1 and 2, every ``QuantizeLinear``/``DequantizeLinear`` pair is checked on its
   own input, on every sentence: its codes must be ``clamp(rint(x / scale) + zero)`` and its
   output ``(code - zero) * scale`` with *that module's* range from ``model.pt``, and every module
   with a range must have its pair. With 2 (the graph without the pairs computes the torch model)
   this shows the whole graph computes the quantized torch model, even when a flip early in a
   sentence hides later layers from the end-to-end comparison (BERT-base at 768 wide: measured,
   nearly every sentence has a flip somewhere).

The export passes only if all of these hold.

It also runs ``onnx.checker.check_model(full_check=True)`` with the ``qbert_edge`` schemas
registered. It does not write files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import onnx

from qbert_edge.errors import QbertEdgeError

#: onnxruntime's integer matmul on a ``QuantizeLinear`` output (``--target ort``: 7-8-bit weights)
INTEGER_MATMUL = "MatMulIntegerToFloat"

ATOL = 1e-3
RTOL = 1e-3
#: A code one step apart counts as a rounding flip when ``x / scale`` is this close to a tie (in steps).
FLIP_MARGIN = 1e-3

SENTENCES = (
    "a gripping, funny and beautifully acted film.",
    "the plot is a mess and the ending is worse.",
    "it's not a great movie, but it is never boring.",
    "one of the most moving stories i have seen in years, with a script that trusts its audience.",
    "dull.",
    "the actors do what they can with a thin, predictable screenplay that goes nowhere.",
    "a small, smart comedy about growing up.",
    "i wanted to love this, and i could not.",
    "visually stunning but emotionally empty, the film drags through its second half.",
    "brilliant!",
    "the director keeps the tension high from the first scene to the last.",
    "a forgettable sequel that adds nothing to the original.",
)


@dataclass(frozen=True)
class OutputCheck:
    """One output compared, sentence by sentence (axis 0)."""

    name: str
    max_abs_diff: float
    max_abs_ref: float
    allowed: float
    bad: tuple[int, ...]  # sentences past ``allowed`` (or, for logits, of another class beyond a near tie)
    n: int
    same_class: int | None = None  # logits only: sentences whose argmax agrees

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        s = f"{self.name}: max|diff| {self.max_abs_diff:.3g} (allowed {self.allowed:.3g}, max|torch| {self.max_abs_ref:.3g})"
        if self.bad:
            s += f", {len(self.bad)}/{self.n} sentences past it"
        if self.same_class is not None:
            s += f", same class {self.same_class}/{self.n}"
        return s


@dataclass(frozen=True)
class ValidationReport:
    """The comparison. When sentences are past the tolerance: ``unquantized`` is the re-check with
    activation quantization off on both sides, ``explained`` says per such sentence what its first
    differing activation codes were (``"flip: ..."`` or ``"mismatch: ..."``)."""

    backend: str
    texts: int
    tokens: int
    checks: tuple[OutputCheck, ...]
    unquantized: tuple[OutputCheck, ...] | None = None
    explained: Mapping[int, str] | None = None
    activation_errors: tuple[str, ...] = ()

    @property
    def bad(self) -> tuple[int, ...]:
        return tuple(sorted({i for c in self.checks for i in c.bad}))

    @property
    def flipped(self) -> int:
        return sum(1 for v in (self.explained or {}).values() if v.startswith("flip"))

    @property
    def ok(self) -> bool:
        if self.activation_errors:
            return False
        if not self.bad:
            return True
        return (
            self.unquantized is not None
            and all(c.ok for c in self.unquantized)
            and self.explained is not None
            and all(self.explained.get(i, "").startswith("flip") for i in self.bad)
        )

    def summary(self) -> str:
        s = f"{self.backend} vs torch on {self.texts} sentences: " + "; ".join(c.summary() for c in self.checks)
        if self.activation_errors:
            s += " | activation quantizers that do not compute model.pt's: " + "; ".join(self.activation_errors[:5])
        if self.explained:
            s += " | " + "; ".join(f"sentence {i}: {v}" for i, v in sorted(self.explained.items()))
        if self.unquantized is not None:
            s += " | with activations unquantized on both sides: " + "; ".join(c.summary() for c in self.unquantized)
        return s


def _feeds(data: Mapping, texts: Sequence[str]) -> dict[str, np.ndarray]:
    from qbert_edge.runtime.text import encode, load_tokenizer

    tokenizer = load_tokenizer(data["tokenizer"])
    return encode(tokenizer, list(texts), max_length=int(data.get("max_length", 128))).arrays


def torch_outputs(
    data: Mapping, feeds: Mapping[str, np.ndarray], name: str = "model.pt", activation_quant: bool = True
) -> dict[str, np.ndarray]:
    """Outputs of the torch model of a ``model.pt`` dict (quantized) or an fp32 dict."""
    return run_torch(_torch_model(data, name), feeds, activation_quant=activation_quant)


def run_torch(model, feeds: Mapping[str, np.ndarray], *, activation_quant: bool = True, capture: dict | None = None):
    """Run a torch BERT on int64 arrays. ``activation_quant=False`` switches the activation quantizers
    off (for good); ``capture`` is filled with plan name -> the input of that Linear's quantizer."""
    import torch

    from qbert_edge.qmodel import ActivationQuant, quantized_modules

    hooks = []
    if capture is not None and any(isinstance(m, ActivationQuant) for m in model.modules()):
        for module_name, module in quantized_modules(model):
            observer = getattr(module, "input_quant", None)
            if observer is not None:
                hooks.append(observer.register_forward_pre_hook(
                    lambda _m, args, _n=module_name: capture.__setitem__(_n, args[0].detach().numpy().copy())
                ))
    if not activation_quant:
        for m in model.modules():
            if isinstance(m, ActivationQuant):  # never observed -> passes values through
                m.fixed = None
                m.seen.zero_()
    try:
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    finally:
        for h in hooks:
            h.remove()
    if hasattr(out, "logits"):
        return {"logits": out.logits.numpy()}
    result = {"last_hidden_state": out.last_hidden_state.numpy()}
    if getattr(out, "pooler_output", None) is not None:
        result["pooler_output"] = out.pooler_output.numpy()
    return result


def _torch_model(data: Mapping, name: str):
    if data.get("plan"):
        from qbert_edge.checkpoint import from_checkpoint

        return from_checkpoint(dict(data), name=name).model.eval()
    import json

    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig.from_dict(json.loads(data["config"]))
    cls = BertForSequenceClassification if data["architecture"] == "BertForSequenceClassification" else BertModel
    model = cls(config).eval()
    prefix = "bert." if cls is BertForSequenceClassification else ""
    state = {(k if k.startswith("classifier.") else prefix + k): v for k, v in data["fp32"].items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if "position_ids" not in k]:
        raise QbertEdgeError(f"{name}: parameters do not match the config")
    return model


def onnx_outputs(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], extra: Sequence[str] = ()
) -> tuple[str, dict[str, np.ndarray]]:
    """``(backend, outputs)``: the reference backend for a portable graph, onnxruntime for an ``ort`` one.

    ``extra``: intermediate values to return as well (added as graph outputs of a copy).
    """
    if extra:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.graph.output.extend(onnx.ValueInfoProto(name=e) for e in extra)
        model = copy
    names = [o.name for o in model.graph.output]
    uses_custom = any(n.domain == "qbert_edge" for n in model.graph.node)
    uses_ms = any(n.domain == "com.microsoft" for n in model.graph.node)
    if uses_ms and not uses_custom:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return "onnxruntime", dict(zip(names, session.run(names, dict(feeds))))
        except Exception as exc:  # onnxruntime's Fail / NotImplemented / InvalidGraph
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise QbertEdgeError(f"onnxruntime cannot run the exported model: {first[:300]}") from None
    from qbert_edge.runtime.reference import run_reference

    return "reference", run_reference(model, feeds, names)


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with full checking, the ``qbert_edge`` op schemas registered."""
    from qbert_edge.runtime.reference import register_schemas

    register_schemas()
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise QbertEdgeError(f"exported model fails onnx.checker: {first}") from None


def compare(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], atol: float = ATOL, rtol: float = RTOL) -> tuple[OutputCheck, ...]:
    """Per output: largest difference and how many sentences (axis 0) are past the tolerance."""
    checks = []
    for name, r in ref.items():
        if name not in got:
            raise QbertEdgeError(f"exported model has no output {name!r}")
        g = got[name]
        if g.shape != r.shape:
            raise QbertEdgeError(f"output {name!r}: shape {list(g.shape)} vs torch {list(r.shape)}")
        n = r.shape[0]
        max_ref = float(np.abs(r).max()) if r.size else 0.0
        allowed = atol + rtol * max_ref
        per_sentence = np.abs(g.astype(np.float64) - r).reshape(n, -1).max(axis=1) if r.size else np.zeros(n)
        bad = ~(per_sentence <= allowed)  # NaN counts as past the tolerance
        same = None
        if name == "logits" and r.ndim == 2 and r.shape[1] > 1:
            agree = g.argmax(-1) == r.argmax(-1)
            top2 = np.sort(r, axis=-1)[:, -2:]
            bad |= ~agree & (top2[:, 1] - top2[:, 0] > 2 * allowed)  # another class, and not a near tie
            same = int(agree.sum())
        diff = float(per_sentence.max()) if n else 0.0
        checks.append(OutputCheck(name, diff, max_ref, allowed, tuple(int(i) for i in np.flatnonzero(bad)), n, same))
    return tuple(checks)


def quantizer_outputs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """``(plan name, output)`` of each ``QuantizeLinear`` of the graph, in graph order."""
    return [(n.name.rsplit("/", 1)[0], n.output[0]) for n in model.graph.node if n.op_type == "QuantizeLinear"]


def explain(
    quantizers: Sequence[tuple[str, str]],
    torch_inputs: Mapping[str, np.ndarray],
    onnx_codes: Mapping[str, np.ndarray],
    activations: Mapping[str, Mapping],
    sentences: Sequence[int],
) -> dict[int, str]:
    """Per sentence: ``"flip: ..."`` or ``"mismatch: ..."`` at its first layer whose activation codes differ.

    ``torch_inputs``: plan name -> the torch quantizer's input; ``onnx_codes``: quantizer output ->
    the ONNX codes; ``activations``: the ``model.pt`` ranges (``scale``, ``zero``).
    """
    verdicts = {}
    for b in sentences:
        verdicts[b] = "mismatch: no activation code differs, yet the outputs do"
        for module, out in quantizers:
            if module not in torch_inputs or module not in activations or out not in onnx_codes:
                continue
            a = activations[module]
            t = torch_inputs[module][b] / np.float32(a["scale"])
            expected = np.clip(np.rint(t) + np.float32(a["zero"]), 0, 255)
            diff = onnx_codes[out][b].astype(np.float32) - expected
            where = diff != 0
            if not where.any():
                continue
            tie = np.abs(t[where] - np.floor(t[where]) - 0.5)
            count = int(where.sum())
            if np.all(np.abs(diff[where]) == 1) and np.all(tie <= FLIP_MARGIN):
                verdicts[b] = f"flip: {count} code(s) of {module} one step apart, at rounding ties (within {tie.max():.1e} step)"
            else:
                verdicts[b] = f"mismatch: {count} code(s) of {module} differ by up to {int(np.abs(diff).max())}"
            break
    return verdicts


def activation_pairs(model: onnx.ModelProto) -> list[tuple[str, str, str, str | None]]:
    """``(plan name, input, codes, output)`` of each ``QuantizeLinear`` followed by a
    ``DequantizeLinear`` (``output``: its result) or read by a ``MatMulIntegerToFloat`` directly
    (the ``--target ort`` graph's 8-bit matmuls; ``output`` None: there is no fp32 result to check)."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    pairs = []
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear":
            continue
        readers = consumers.get(q.output[0], [])
        dq = next((c for c in readers if c.op_type == "DequantizeLinear"), None)
        if dq is not None or any(c.op_type == INTEGER_MATMUL for c in readers):
            pairs.append((q.name.rsplit("/", 1)[0], q.input[0], q.output[0], dq.output[0] if dq is not None else None))
    return pairs


def check_activation_pairs(
    pairs: Sequence[tuple[str, str, str, str | None]], values: Mapping[str, np.ndarray], activations: Mapping[str, Mapping]
) -> tuple[str, ...]:
    """Problems with the graph's activation quantization, checked pair by pair on the pair's own input."""
    errors = []
    seen = set()
    for module, x_name, q_name, dq_name in pairs:
        seen.add(module)
        a = activations.get(module)
        if a is None:
            errors.append(f"{module}: quantized in the graph, not in model.pt")
            continue
        scale, zero = np.float32(a["scale"]), np.float32(a["zero"])
        t = values[x_name] / scale
        expected = np.clip(np.rint(t) + zero, 0, 255)
        codes = values[q_name].astype(np.float32)
        diff = codes - expected
        at_tie = (np.abs(diff) == 1) & (np.abs(t - np.floor(t) - 0.5) <= FLIP_MARGIN)
        if np.any((diff != 0) & ~at_tie):
            errors.append(f"{module}: {int(((diff != 0) & ~at_tie).sum())} codes differ from clamp(rint(x/scale)+zero)")
        elif dq_name is not None and not np.array_equal(values[dq_name], (codes - zero) * scale):
            errors.append(f"{module}: DequantizeLinear output is not (code - zero) * scale")
    for module in sorted(set(activations) - seen):
        errors.append(f"{module}: model.pt quantizes its input, the graph does not")
    return tuple(errors)


def without_activation_quant(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``QuantizeLinear -> DequantizeLinear`` pairs are removed, and whose
    ``MatMulIntegerToFloat`` nodes are fp32 matmuls of the unquantized input and their dequantized
    weight (an fp32 initializer: a ``DequantizeLinear -> MatMul`` would be fused back by onnxruntime)."""
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    producer = {o: n for n in out.graph.node for o in n.output}
    inits = {t.name: t for t in out.graph.initializer}
    rename: dict[str, str] = {}
    drop = set()
    for node in out.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in producer:
            q = producer[node.input[0]]
            if q.op_type == "QuantizeLinear":
                rename[node.output[0]] = q.input[0]
                drop.update((id(node), id(q)))
    nodes = []
    for n in out.graph.node:
        if id(n) in drop:
            continue
        q = producer.get(n.input[0]) if n.op_type == INTEGER_MATMUL else None
        if q is None or q.op_type != "QuantizeLinear":
            nodes.append(n)
            continue
        # y = x @ ((B - b_zero) * b_scale) [+ bias]: inputs A, B, a_scale, b_scale, a_zero, b_zero, bias
        value = {i: numpy_helper.to_array(inits[i]) for i in n.input[1:] if i in inits}
        b, b_scale = value[n.input[1]], value[n.input[3]]
        b_zero = value[n.input[5]] if len(n.input) > 5 and n.input[5] else np.zeros(1, np.uint8)
        bias = n.input[6] if len(n.input) > 6 else ""
        w, y = f"{n.name}/unquantized_W", f"{n.name}/unquantized_Y"
        out.graph.initializer.append(numpy_helper.from_array(
            ((b.astype(np.float32) - b_zero.astype(np.float32)) * b_scale.astype(np.float32)).astype(np.float32), w))
        nodes.append(helper.make_node("MatMul", [q.input[0], w], [y if bias else n.output[0]], name=f"{n.name}/unquantized"))
        if bias:
            nodes.append(helper.make_node("Add", [y, bias], [n.output[0]], name=f"{n.name}/unquantized_bias"))
        if not any(id(m) != id(n) and q.output[0] in m.input for m in out.graph.node):
            drop.add(id(q))
    nodes = [n for n in nodes if id(n) not in drop]
    for n in nodes:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    inits = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    return out


def validate_export(
    model: onnx.ModelProto,
    data: Mapping,
    texts: Sequence[str] | None = None,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    name: str = "model.pt",
    check: bool = True,
) -> ValidationReport:
    """Check ``model`` (full onnx.checker, unless ``check`` is False) and compare it with the torch model of ``data``."""
    if check:
        check_model(model)
    texts = list(texts or SENTENCES)
    feeds = _feeds(data, texts)
    torch_model = _torch_model(data, name)
    captured: dict[str, np.ndarray] = {}
    ref = run_torch(torch_model, feeds, capture=captured)
    quantizers = quantizer_outputs(model)
    pairs = activation_pairs(model)
    extra = sorted({name for p in pairs for name in p[1:] if name} | {out for _, out in quantizers})
    backend, got = onnx_outputs(model, feeds, extra=extra)
    checks = compare({k: got[k] for k in ref}, ref, atol, rtol)
    activation_errors = check_activation_pairs(pairs, got, data.get("activations") or {})
    unquantized = explained = None
    bad = sorted({i for c in checks for i in c.bad})
    if bad and data.get("activations"):
        explained = explain(quantizers, captured, got, data["activations"], bad)
        ref = run_torch(torch_model, feeds, activation_quant=False)
        _, got = onnx_outputs(without_activation_quant(model), feeds)
        unquantized = compare(got, ref, atol, rtol)
    return ValidationReport(
        backend, len(texts), int(feeds["attention_mask"].sum()), checks, unquantized, explained, activation_errors
    )
