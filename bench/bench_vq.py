"""Stage-0 VQ term: the project's chunked ``vq_commitment_loss`` vs a dense formulation, time and peak memory.

One step = the loss on a prompt [N, H] (a leaf that requires grad, N = B*Q) against a frozen codebook
[V, H] (the LLM's input embeddings) + backward to the prompt.

- chunked: ``lavis_pformer.losses.vq_commitment_loss`` (nearest row by ``||E_j||^2 - 2 x.E_j`` in fp32,
  chunk by chunk over V under no_grad, keeping a running min/argmin; then a gather of the rows).
- dense (written here, the usual VQ-VAE code): the full [N, V] fp32 distance matrix
  ``||x||^2 + ||E||^2 - 2 x E^T`` computed with autograd on (x requires grad; nothing of it is needed for
  the backward, but the matrix and its graph live until the loss is built), argmin, a dense one-hot
  [N, V] and ``one_hot @ E`` to select the rows; same MSE to the selected rows.

Both give the same loss (the nearest rows are compared; fp32 ties aside). Vocabulary sizes up to OPT's
50,272. Defaults: H = 256, N = 8*32 on CPU; H = 2560 (OPT-2.7B), N = 128*32, fp16 codebook on CUDA.

    python bench/bench_vq.py
    python bench/bench_vq.py --device cuda
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
import measure as M  # noqa: E402
import reporting as R  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SCRIPT = "bench_vq"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dense_vq_loss(prompt, codebook):
    """MSE(prompt, sg(E[argmin_j ||prompt - E_j||])) through a full [N, V] distance matrix and a one-hot."""
    flat = prompt.reshape(-1, prompt.size(-1)).float()
    emb = codebook.float()
    dist = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1).unsqueeze(0) - 2.0 * flat @ emb.t()  # [N, V]
    idx = dist.argmin(dim=1)
    one_hot = torch.zeros(flat.size(0), emb.size(0), device=flat.device, dtype=flat.dtype)
    one_hot.scatter_(1, idx.unsqueeze(1), 1.0)
    quantized = one_hot @ emb  # [N, H]
    return F.mse_loss(flat, quantized.detach()), idx


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--vocab", default="1000,10000,50272", help="comma list of vocabulary sizes V")
    parser.add_argument("--hidden", type=int, default=None, help="H (default 256 on CPU, 2560 on CUDA)")
    parser.add_argument("--tokens", type=int, default=None, help="N = B*Q (default 8*32 on CPU, 128*32 on CUDA)")
    parser.add_argument("--codebook-dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the frozen embeddings (default fp32 on CPU, fp16 on CUDA as OPT)")
    parser.add_argument("--chunk-size", type=int, default=8192, help="chunk of the project's loss (stage-0 default)")
    parser.add_argument("--repeats", type=int, default=None, help="default 21 on CPU, 10 on CUDA")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results-dir", default=C.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = str(torch.device(args.device))
    cuda = args.device.startswith("cuda")
    args.repeats = args.repeats or (10 if cuda else 21)
    args.hidden = args.hidden or (2560 if cuda else 256)
    args.tokens = args.tokens or ((128 if cuda else 8) * 32)
    args.codebook_dtype = args.codebook_dtype or ("fp16" if cuda else "fp32")
    if args.threads is None and not cuda:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def measure_vocab(vocab, args):
    """Both formulations at vocabulary size ``vocab``: the result record and its two table rows."""
    from lavis_pformer.losses import nearest_codebook_rows, vq_commitment_loss

    g = torch.Generator().manual_seed(vocab)
    codebook = (torch.randn(vocab, args.hidden, generator=g) * 0.02).to(args.device, DTYPES[args.codebook_dtype])
    prompt = (torch.randn(args.tokens, args.hidden, generator=g) * 0.02).to(args.device).requires_grad_(True)

    def chunked():
        prompt.grad = None
        vq_commitment_loss(prompt, codebook, chunk_size=args.chunk_size).backward()

    def dense():
        prompt.grad = None
        dense_vq_loss(prompt, codebook)[0].backward()

    def no_grad():
        prompt.grad = None

    times = M.time_interleaved({"chunked": chunked, "dense": dense}, args.repeats, args.warmup, args.device)
    peaks = {"chunked": M.peak_memory(chunked, args.device, before=no_grad),
             "dense": M.peak_memory(dense, args.device, before=no_grad)}
    with torch.no_grad():
        idx_chunked = nearest_codebook_rows(prompt, codebook, args.chunk_size)
        loss_dense, idx_dense = dense_vq_loss(prompt, codebook)
        loss_chunked = vq_commitment_loss(prompt, codebook, args.chunk_size)
    same_rows = float((idx_chunked == idx_dense).float().mean())
    r = M.ratio_summary(times["chunked"], times["dense"])
    res = dict(vocab=vocab, hidden=args.hidden, tokens=args.tokens, chunked=M.summarize(times["chunked"]),
               dense=M.summarize(times["dense"]), chunked_peak_bytes=peaks["chunked"],
               dense_peak_bytes=peaks["dense"], time_ratio=r,
               peak_ratio=peaks["chunked"] / peaks["dense"], same_rows_fraction=same_rows,
               loss_chunked=float(loss_chunked), loss_dense=float(loss_dense),
               dense_matrix_bytes=args.tokens * vocab * 4, times_s=times)
    rows = []
    for key in ("chunked", "dense"):
        s = res[key]
        rows.append([f"{vocab:,}", "vq_commitment_loss (chunked)" if key == "chunked" else "dense [N,V] + one-hot",
                     R.fmt_s(s["median"]), R.fmt_spread(s),
                     f"**{r['ratio']:.3f}x**" if key == "chunked" else "1",
                     f"{r['paired_min']:.3f}–{r['paired_max']:.3f}" if key == "chunked" else "",
                     f"{r['min_ratio']:.3f}x" if key == "chunked" else "",
                     R.fmt_mb(peaks[key]), f"**{res['peak_ratio']:.3f}x**" if key == "chunked" else "1",
                     f"{same_rows:.4f}" if key == "chunked" else ""])
    print(f"V={vocab}: time {r['ratio']:.3f}x, peak {res['peak_ratio']:.3f}x", flush=True)
    return res, rows


def main(argv=None):
    args = parse_args(argv)
    C.quiet()
    machine = R.machine_info(args.device)
    results, rows = [], []
    for vocab in [int(v) for v in args.vocab.split(",") if v.strip()]:
        res, vocab_rows = measure_vocab(vocab, args)
        results.append(res)
        rows += vocab_rows
    headers = ["V", "formulation", "step ms (median)", "IQR (min–max) ms", "time ratio", "paired ratio min–max",
               "ratio of minima",
               "peak MB above start", "peak ratio", "same nearest rows"]
    sizes_line = (f"N={args.tokens} prompt vectors, H={args.hidden}, codebook {args.codebook_dtype}, "
                  f"chunk {args.chunk_size}, {args.device}")
    notes = ["ratios: chunked / dense (below 1: the project's loss is faster / smaller).",
             f"memory: {M.MEMORY_METHOD[C.device_tag(args.device)]}; the codebook and prompt exist before the step."]
    payload = dict(machine=machine, sizes_line=sizes_line, args=vars(args), argv=argv, results=results)
    R.publish(SCRIPT, args, machine, sizes_line, R.markdown_table(headers, rows), notes, payload)
    return payload


if __name__ == "__main__":
    main()
