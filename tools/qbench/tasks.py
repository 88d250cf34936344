"""What a bench row is measured on: a task per model kind, the same inputs for every row.

Encoders: mean-pooled sentence embeddings against fp32 (mean and min cosine, Spearman of all pairwise
similarities, nearest-neighbour agreement); latency of one batch. Causal LMs: perplexity on fixed
windows; latency of a batch-1 one-token step (a forward of one token, no KV cache). Latency is always
taken against the fp32 model in alternating runs (fixed thread count, medians), so that the ratio
holds on a noisy machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from qcompiler.runtime.evaluate import fidelity, perplexity, pooled_embeddings, session_feeds
from qcompiler.runtime.session import SessionOptions, make_session

THREADS = 2


@dataclass
class Task:
    kind: str  # encoder | lm
    inputs: list  # encoder: tokenized batches; lm: [windows, length] ids
    latency_feeds: dict[str, np.ndarray]
    latency_reps: int
    describe: str  # what the metric is measured on, for the results page
    reference: dict = field(default_factory=dict)  # fp32's embeddings (encoder)

    @property
    def primary(self) -> tuple[str, bool]:
        """The column that ranks rows, and whether higher is better."""
        return ("mean_cos", True) if self.kind == "encoder" else ("perplexity", False)

    def set_reference(self, fp32: str) -> None:
        if self.kind == "encoder":
            self.reference["emb"] = pooled_embeddings(fp32, self.inputs, SessionOptions(device="cpu", threads=THREADS))

    def quality(self, model: str) -> dict[str, float]:
        opts = SessionOptions(device="cpu", threads=THREADS)
        if self.kind == "lm":
            return {"perplexity": perplexity(model, self.inputs, opts).perplexity}
        f = fidelity(pooled_embeddings(model, self.inputs, opts), self.reference["emb"])
        return {"mean_cos": f.mean_cosine, "min_cos": f.min_cosine, "spearman": f.spearman,
                "nn_agreement": f.nn_agreement}


def latency_session(model: str, threads: int = THREADS) -> ort.InferenceSession:
    return make_session(model, SessionOptions(device="cpu", threads=threads))


def alternating_latency(model: str, reference: ort.InferenceSession, feeds: dict[str, np.ndarray],
                        reps: int) -> tuple[float, float]:
    """Median milliseconds of ``model`` and the ``reference`` session (made once per model by
    ``latency_session``), timed in alternating (ABBA) runs."""
    sa, sb = latency_session(model), reference
    fa, fb = session_feeds(sa, feeds), session_feeds(sb, feeds)
    for _ in range(2):  # warm-up
        sa.run(None, fa)
        sb.run(None, fb)
    ta, tb = [], []
    pairs = [(sa, fa, ta), (sb, fb, tb)]
    for i in range(reps):
        for s, f, t in (pairs if i % 2 == 0 else pairs[::-1]):  # ABBA: no order bias
            t0 = time.perf_counter()
            s.run(None, f)
            t.append(time.perf_counter() - t0)
    return float(np.median(ta)) * 1e3, float(np.median(tb)) * 1e3


def runs_in_plain_onnxruntime(model: str, feeds: dict[str, np.ndarray]) -> bool:
    """A stock ``InferenceSession`` (CPU, default options) loads and runs the file."""
    try:
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        sess.run(None, session_feeds(sess, feeds))
        return True
    except Exception:
        return False


def encoder_task(batches: list[dict[str, np.ndarray]], latency_batch: tuple[int, int], reps: int,
                 describe: str, vocab: int) -> Task:
    rng = np.random.default_rng(0)
    b, length = latency_batch
    feeds = {"input_ids": rng.integers(5, vocab, (b, length)).astype(np.int64),
             "attention_mask": np.ones((b, length), np.int64)}
    return Task("encoder", batches, feeds, reps, describe)


def lm_task(windows: np.ndarray, reps: int, describe: str) -> Task:
    feeds = {"input_ids": np.array([[int(windows[0, 0])]], np.int64), "attention_mask": np.ones((1, 1), np.int64)}
    return Task("lm", windows, feeds, reps, describe)
