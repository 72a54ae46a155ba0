"""`--plot out.png`: tok/s against depth (throughput), n-max (spec) or concurrency (parallel), one line per
configuration (and llama-server's, dashed, when it ran). matplotlib is an optional dependency."""

from __future__ import annotations

from nextn.errors import NextnError


def require():
    """matplotlib.pyplot with a non-interactive backend, or a NextnError saying how to get it (checked before
    the bench runs, not after)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NextnError("--plot needs matplotlib, an optional dependency: pip install matplotlib "
                         "(Arch: pacman -S python-matplotlib)") from None
    return plt


def _save(plt, fig, path: str, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def plot_throughput(doc: dict, path: str) -> None:
    plt = require()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    tg = [r for r in doc["results"] if r["kind"] == "tg"]
    pp = [r for r in doc["results"] if r["kind"] == "pp"]
    for cfg in dict.fromkeys(r["config"] for r in doc["results"]):
        rows = sorted((r for r in tg if r["config"] == cfg), key=lambda r: r["depth"])
        if rows:
            ax[0].plot([r["depth"] for r in rows], [r["tok_s"]["median"] for r in rows], "o-", label=f"nextn {cfg}")
            if all("llama_server" in r for r in rows):
                ax[0].plot([r["depth"] for r in rows], [r["llama_server"]["tok_s"]["median"] for r in rows], "s--",
                           label=f"llama-server {cfg}")
        rows = sorted((r for r in pp if r["config"] == cfg), key=lambda r: r["n_prompt"])
        if rows:
            ax[1].plot([r["n_prompt"] for r in rows], [r["tok_s"]["median"] for r in rows], "o-", label=f"nextn {cfg}")
            if all("llama_server" in r for r in rows):
                ax[1].plot([r["n_prompt"] for r in rows], [r["llama_server"]["tok_s"]["median"] for r in rows], "s--",
                           label=f"llama-server {cfg}")
    ax[0].set(xlabel="depth (tokens already in the context)", ylabel="decode tok/s", title="decode")
    ax[1].set(xlabel="prompt tokens", ylabel="prompt tok/s", title="prompt processing")
    if pp:
        ax[1].set_xscale("log", base=2)
        sizes = sorted({r["n_prompt"] for r in pp})
        ax[1].set_xticks(sizes, [str(n) for n in sizes])
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
        a.set_ylim(bottom=0)
    _save(plt, fig, path, f"nextn bench throughput: {doc['model']['file']}")


def plot_spec(doc: dict, path: str) -> None:
    """Aggregate decode tok/s against n-max, one line per configuration differing only in n_max; none is
    n-max 0 of every line."""
    from nextn.devtools.bench.configs import BenchConfig, without

    plt = require()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    none = doc["results"][0]
    groups: dict[str, list] = {}
    for e, c in zip(doc["results"], doc["configs"], strict=True):
        if e["config"] != "none":
            cfg = BenchConfig(tuple(c["types"]), tuple((k, tuple(v) if isinstance(v, list) else v)
                                                       for k, v in c["params"].items()))
            groups.setdefault(without(cfg, "n_max"), []).append(e)
    for label, es in groups.items():
        es = [none, *sorted(es, key=lambda e: e["n_max"])]
        ax.plot([e["n_max"] for e in es], [e["aggregate"]["tok_s"] for e in es], "o-", label=f"nextn {label}")
        if all("llama_server" in e for e in es):
            ax.plot([e["n_max"] for e in es], [e["llama_server"]["aggregate"]["tok_s"] for e in es], "s--",
                    label=f"llama-server {label}")
    ax.axhline(none["aggregate"]["tok_s"] or 0, color="grey", lw=0.8, ls=":", label="none")
    ax.set_xticks(sorted({e["n_max"] for e in doc["results"]}))
    ax.set(xlabel="n-max (draft tokens per step; 0: none)", ylabel="decode tok/s (all prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    _save(plt, fig, path, f"nextn bench spec: {doc['model']['file']}")


def plot_parallel(doc: dict, path: str) -> None:
    plt = require()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cfg in dict.fromkeys(r["config"] for r in doc["results"]):
        rows = [r for r in doc["results"] if r["config"] == cfg]
        ax.plot([r["concurrency"] for r in rows], [r["aggregate_tok_s"] for r in rows], "o-", label=f"nextn {cfg}")
        if all("llama_server" in r for r in rows):
            ax.plot([r["concurrency"] for r in rows], [r["llama_server"]["aggregate_tok_s"] for r in rows], "s--",
                    label=f"llama-server {cfg}")
    ax.set(xlabel="concurrent requests", ylabel="aggregate tok/s", xticks=doc["settings"]["concurrency"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    _save(plt, fig, path, f"nextn bench parallel: {doc['model']['file']}")
