"""Per-layer reports and `validate` tables at 80 columns (issue 9): the worst rows with short
block-relative names, the measured error (output, else weight error) in table and plot, the
scheme in the plot title, a per-kind validate summary, failures only unless verbose."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from matplotlib.figure import Figure
from rich.console import Console, RenderableType
from rich.table import Table

import compress
from compress import report
from compress.pipeline.pass_api import Pass, PassConfig
from compress.passes.lowrank import LowRankConfig, LowRankPass
from compress.passes.quantize import GPTQConfig, GPTQPass, QuantConfig, RTNPass
from compress.passes.slicegpt import SliceConfig, SliceGPTPass
from compress.report import LayerRecord, figure, print_table, read_csv, read_json, short_name, table
from compress.validate import Check, ValidationReport, module_table, summary_table, validate

LLAMA_ROLES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BERT_ROLES = ("attention.self.query", "attention.self.key", "attention.self.value",
              "attention.output.dense", "intermediate.dense", "output.dense")


def render(*items: RenderableType) -> list[str]:
    """What an 80-column terminal shows for ``items``, line by line."""
    console = Console(width=80, record=True, file=io.StringIO())
    for item in items:
        console.print(item)
    return console.export_text().splitlines()


def assert_fits(lines: list[str]) -> None:
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    assert not any("…" in line for line in lines), "\n".join(lines)


def assert_row(lines: list[str], *cells: str) -> None:
    """Some single line holds every cell: the row neither wrapped nor lost a digit."""
    assert any(all(c in line for c in cells) for line in lines), (cells, "\n".join(lines))


def records(n_layers: int = 30, roles: tuple[str, ...] = LLAMA_ROLES, prefix: str = "model.layers",
            measured: str = "error") -> list[LayerRecord]:
    """One record per block linear; the error grows with the block and the role index, so the
    worst records are known: the last blocks' last roles."""
    out = []
    for i in range(n_layers):
        for j, rel in enumerate(roles):
            value = (1 + i * len(roles) + j) * 1e-4
            out.append(LayerRecord(stage="gptq", layer=i, module=f"{prefix}.{i}.{rel}", kind="quant", bits=4.25,
                                   time_s=123.45, bytes=4096 * 11008 // 2, params=4096 * 11008,
                                   **{measured: value}))
    return out


def body(t: Table) -> list[list[str]]:
    """The cells of ``t``, row by row."""
    return [list(row) for row in zip(*(list(c.cells) for c in t.columns), strict=True)]


# -- short names -------------------------------------------------------------------------------
def test_short_names_are_block_relative_and_distinct() -> None:
    assert short_name("model.layers.12.self_attn.q_proj", 12) == "L12 self_attn.q"
    assert short_name("model.layers.3.mlp.gate_proj", 3) == "L3 mlp.gate"
    assert short_name("lm_head", -1) == "lm_head"
    assert short_name("model.embed_tokens", -1) == "model.embed_tokens"
    assert short_name("encoder.layer.11.attention.output.dense") == "L11 attention.output.dense"
    assert short_name("model.layers.3.mlp.experts.3.down_proj", 3) == "L3 mlp.experts.3.down"
    names = {short_name(f"model.layers.7.{rel}", 7) for rel in LLAMA_ROLES}
    assert len(names) == len(LLAMA_ROLES) and "L7 self_attn.o" in names


# -- per-layer table ---------------------------------------------------------------------------
def test_table_shows_the_worst_rows_first_within_80_columns() -> None:
    recs = records()
    t = table(recs, "w4 on llama: per-layer report", limit=20, csv_hint="out/reports/report.csv")
    rows = body(t)
    worst = sorted(recs, key=lambda r: r.error or 0.0, reverse=True)[:20]
    assert [r[0] for r in rows] == [short_name(r.module, r.layer) for r in worst]
    assert rows[0][0] == "L29 mlp.down" and "L0 self_attn.q" not in {r[0] for r in rows}
    lines = render(t)
    assert_fits(lines)
    for r in worst:
        assert_row(lines, short_name(r.module, r.layer), f"{r.error:.2e}", "22016")
    text = "\n".join(lines)
    assert "rel. out err" in text and "worst 20 of 210 by rel. output error" in text
    assert "all rows: out/reports/report.csv" in text


def test_bert_names_fit_too() -> None:
    recs = records(12, BERT_ROLES, prefix="encoder.layer")
    lines = render(table(recs, limit=len(recs)))
    assert_fits(lines)
    assert_row(lines, "L11 attention.output.dense", f"{recs[-3].error:.2e}")
    assert "72 modules, worst first by rel. output error" in "\n".join(lines)


def test_data_free_records_show_their_weight_error() -> None:
    recs = records(4, measured="weight_error")
    t = table(recs, limit=5)
    lines = render(t)
    assert_fits(lines)
    assert "rel. W err" in lines[1] and "by rel. weight error" in "\n".join(lines)
    assert_row(lines, "L3 mlp.down", f"{recs[-1].weight_error:.2e}")
    assert all(cell for row in body(t) for cell in row[:4])  # no empty error column


def test_nan_errors_come_first_and_unmeasured_rows_last() -> None:
    recs = records(2)
    recs[3] = recs[3].model_copy(update={"error": float("nan")})
    recs[-1] = recs[-1].model_copy(update={"error": None})
    names = [r[0] for r in body(table(recs, limit=len(recs)))]
    assert names[0] == "L0 self_attn.o" and names[-1] == "L1 mlp.down" and names[1] == "L1 mlp.up"


def test_output_error_wins_when_both_are_measured() -> None:
    recs = [r.model_copy(update={"weight_error": 1.0 - (r.error or 0)}) for r in records(3)]
    rows = body(table(recs, limit=3))
    assert [r[0] for r in rows] == ["L2 mlp.down", "L2 mlp.up", "L2 mlp.gate"]


def test_print_table_fits_a_COLUMNS_80_terminal(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    print_table(records(), title="rtn W4 g128 sym on llama")  # the default console (stderr)
    lines = capsys.readouterr().err.splitlines()
    assert_fits(lines)
    assert_row(lines, "L29 mlp.down", "2.10e-02")


# -- CSV / JSON --------------------------------------------------------------------------------
def test_csv_and_json_round_trip_the_weight_error(tmp_path: Path) -> None:
    recs = records(2, measured="weight_error") + [LayerRecord(stage="rtn", layer=-1, module="lm_head", kind="dense")]
    report.write_csv(recs, tmp_path / "r.csv")
    report.write_json(recs, tmp_path / "r.json")
    assert read_csv(tmp_path / "r.csv") == recs and read_json(tmp_path / "r.json") == recs
    assert "weight_error" in (tmp_path / "r.csv").read_text().splitlines()[0]


def test_reports_written_before_weight_error_still_read(tmp_path: Path) -> None:
    old = tmp_path / "old.csv"
    old.write_text("stage,layer,module,kind,bits,error,time_s,bytes,params,extra\n"
                   'rtn,0,model.layers.0.mlp.up_proj,quant,4.5,,0.1,100,200,"{""weight_rel_err"": 0.03}"\n')
    (rec,) = read_csv(old)
    assert rec.weight_error is None and rec.error is None and rec.extra == {"weight_rel_err": 0.03}
    (tmp_path / "old.json").write_text('[{"stage": "gptq", "layer": 1, "module": "m.1", "kind": "quant", '
                                       '"error": 0.01, "time_s": 0.0, "bytes": 0, "params": 0, "extra": {}}]')
    assert read_json(tmp_path / "old.json")[0].weight_error is None


# -- plot --------------------------------------------------------------------------------------
def test_plot_of_a_data_free_pass_shows_the_weight_error(tmp_path: Path) -> None:
    recs = records(4, measured="weight_error")
    fig = figure(recs, "rtn W3 g128 asym on llama")
    ax = fig.axes[0]
    assert "rtn W3 g128 asym" in ax.get_title() and "weight" in ax.get_ylabel()
    assert len(ax.lines) == len(LLAMA_ROLES) and all(len(line.get_xdata()) == 4 for line in ax.lines)
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {r.removesuffix("_proj") for r in LLAMA_ROLES}
    report.plot(recs, tmp_path / "report.png", "rtn W3 g128 asym on llama")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_says_when_nothing_was_measured() -> None:
    recs = [r.model_copy(update={"error": None}) for r in records(2)]
    ax = figure(recs, "x W4 on y").axes[0]
    assert not ax.lines and [t.get_text() for t in ax.texts] == ["no per-layer error measured"]


def test_plot_of_all_zero_errors_is_not_empty() -> None:
    recs = [r.model_copy(update={"error": 0.0}) for r in records(2)]
    ax = figure(recs, "lowrank ratio 1 whitened on y").axes[0]
    assert len(ax.lines) == len(LLAMA_ROLES) and ax.get_yscale() == "linear"


# -- schemes -----------------------------------------------------------------------------------
SMOLLM2 = [(rel, 1536 if "gate" in rel or "up" in rel else 576, 1536 if "down" in rel else 576)
           for rel in LLAMA_ROLES]


def test_quant_schemes_show_the_resolved_group_size() -> None:
    rtn = RTNPass(QuantConfig(bits=3, symmetric=False))
    assert rtn.scheme() == "rtn W3 g-auto asym"
    rtn.resolve(SMOLLM2)
    assert rtn.scheme() == "rtn W3 g64 asym"
    gptq = GPTQPass(GPTQConfig())
    gptq.resolve([(rel, 4096, 11008 if "down" in rel else 4096) for rel in LLAMA_ROLES])
    assert gptq.scheme() == "gptq W4 g128 sym act-order mse"
    plain = GPTQPass(GPTQConfig(bits=8, group_size=None, act_order=False, mse=False, static_groups=True))
    plain.resolve(SMOLLM2)
    assert plain.scheme() == "gptq W8 per-channel sym static-groups"
    assert RTNPass(QuantConfig(group_size=32, mse=True)).scheme() == "rtn W4 g32 sym mse"


def test_other_schemes() -> None:
    assert LowRankPass(LowRankConfig(ratio=0.5)).scheme() == "lowrank ratio 0.5 whitened"
    assert LowRankPass(LowRankConfig(energy=0.9, whiten=False, per_head=True)).scheme() == \
        "lowrank energy 0.9 per-head plain SVD"
    assert LowRankPass(LowRankConfig(ranks={"model.layers.0.mlp.up_proj": 4}, whiten=False)).scheme() == \
        "lowrank 1 explicit ranks plain SVD"
    assert SliceGPTPass(SliceConfig(sparsity=0.25)).scheme() == "slicegpt 25% sliced"
    assert SliceGPTPass(SliceConfig(schedule=[0.1, 0.4, 0.2], slice_head=True)).scheme() == \
        "slicegpt schedule 10%–40% sliced slice-head"

    class Dummy(Pass):
        name = "dummy"

        def process_layer(self, ctx: object, run: object) -> list[LayerRecord]:
            return []

    assert Dummy(PassConfig()).scheme() == "dummy"
    assert Dummy(PassConfig(targets=["mlp"])).scheme() == "dummy targets=['mlp']"


# -- a real data-free run ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def rtn_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """RTN W3 asym of the tiny LLaMA, and the titles its report plots were drawn with."""
    titles: list[str] = []
    real = report.figure

    def spy(recs: list[LayerRecord], title: str) -> Figure:
        titles.append(title)
        return real(recs, title)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "figure", spy)
        out = compress.run({"stages": [{"pass": "rtn", "config": {"bits": 3, "symmetric": False}}]},
                           tiny_llama, tmp_path_factory.mktemp("rtn") / "w3")
    return out, titles


def test_rtn_records_weight_error_and_plots_it_under_its_scheme(rtn_run: tuple[Path, list[str]]) -> None:
    out, titles = rtn_run
    recs = read_json(out / "reports" / "report.json")
    assert len(recs) == 21 and all(r.error is None and 0 < (r.weight_error or 0) < 1 for r in recs)
    assert read_csv(out / "reports" / "report.csv") == recs
    assert titles == ["rtn W3 g32 asym on llama"]  # the tiny model's widths 64/96: auto → 32
    lines = render(table(recs, csv_hint="w3/reports/report.csv"))
    assert_fits(lines)
    assert "rel. W err" in "\n".join(lines)
    worst = max(recs, key=lambda r: r.weight_error or 0)
    assert_row(lines, short_name(worst.module, worst.layer), f"{worst.weight_error:.2e}")


# -- validate tables ---------------------------------------------------------------------------
PATHS = {1: "torch twin · planes", 17: "torch twin · planes", 300: "torch twin · dequant+matmul"}
TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 1e-3}


def synthetic_report(names: list[str], kinds: list[str], dtypes: tuple[str, ...] = ("fp32", "bf16", "fp16"),
                     bad: tuple[str, str, int] | None = None) -> ValidationReport:
    """Checks of ``names`` at M = 1, 17, 300; ``bad`` = (module, dtype, M) gets a wrong result."""
    rep = ValidationReport("/models/smollm2-w4", list(PATHS), list(dtypes), {d: TOL[d] for d in dtypes}, 0)
    for name, kind in zip(names, kinds, strict=True):
        for dt in dtypes:
            for m, path in PATHS.items():
                rel = 0.3 * TOL[dt] if (name, dt, m) != bad else 0.123
                rep.checks.append(Check(name, kind, dt, m, path, rel, rel * 10, TOL[dt], rel <= TOL[dt]))
    return rep


def llama_names(n_layers: int = 32) -> list[str]:
    return [f"model.layers.{i}.{rel}" for i in range(n_layers) for rel in LLAMA_ROLES]


def test_validate_lists_only_failures_unless_verbose() -> None:
    names = llama_names()
    rep = synthetic_report(names, ["quant"] * len(names), bad=("model.layers.30.self_attn.k_proj", "bf16", 300))
    rep.unvalidated = {"model.layers.31.mlp.down_proj": "lowrank"}
    lines = render(module_table(rep))
    assert_fits(lines)
    text = "\n".join(lines)
    assert "L30 self_attn.k" in text and "L30 self_attn.q" not in text and "L0 mlp.up" not in text
    assert_row(lines, "L30 self_attn.k", "twin dequant (300)", "3.0e-06", "1.2e-01", "3.0e-04", "FAIL")
    assert_row(lines, "L30 self_attn.k", "twin planes (1 17)", "ok")
    assert_row(lines, "L31 mlp.down", "lowrank", "no reference", "FAIL")
    verbose = render(module_table(rep, verbose=True))
    assert_fits(verbose)
    for name in names:
        assert_row(verbose, short_name(name), "twin planes (1 17)")


def test_validate_without_failures_says_so_in_one_line() -> None:
    names = llama_names(2)
    rep = synthetic_report(names, ["quant"] * len(names))
    (line,) = render(module_table(rep))
    assert "all 14 modules within tolerance" in line and "--verbose" in line


def test_validate_summary_is_per_kind_within_80_columns() -> None:
    names = llama_names()
    kinds = ["lowrank" if "mlp" in n else "quant" for n in names]
    rep = synthetic_report(names, kinds, bad=("model.layers.3.mlp.up_proj", "fp16", 1))
    rep.unvalidated = {"model.layers.31.extra": "sliced"}
    lines = render(summary_table(rep))
    assert_fits(lines)
    assert "fp32 ≤1e-05" in "\n".join(lines) and "twin dequant, twin planes" in "\n".join(lines)
    assert_row(lines, "lowrank", "96", "864", "3.0e-06", "3.0e-03", "1.2e-01", "1")
    assert_row(lines, "quant", "128", "1152", "3.0e-06", "3.0e-03", "3.0e-04", "0")
    assert_row(lines, "sliced", "1", "0", "1")


def test_mixed_kinds_get_a_kind_column_and_bert_names_fit() -> None:
    names = [f"encoder.layer.{i}.{rel}" for i in range(12) for rel in BERT_ROLES]
    kinds = ["lowrank" if "dense" in n else "quant" for n in names]
    rep = synthetic_report(names, kinds, dtypes=("fp32", "bf16"))
    lines = render(module_table(rep, verbose=True), summary_table(rep))
    assert_fits(lines)
    assert_row(lines, "L11 attention.output.dense", "lowrank", "twin dequant (300)", "3.0e-06", "3.0e-03", "ok")


def test_validate_tables_of_a_real_checkpoint_fit(rtn_run: tuple[Path, list[str]]) -> None:
    rep = validate(rtn_run[0], ms=[1, 17, 300], dtypes=["fp32", "bf16", "fp16"])
    assert rep.ok
    lines = render(module_table(rep, verbose=True), summary_table(rep), module_table(rep))
    assert_fits(lines)
    assert_row(lines, "L2 self_attn.o", "twin dequant (300)", "ok")
    assert_row(lines, "quant", "21", str(21 * 9), "0")
