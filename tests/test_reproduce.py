"""tools/reproduce.py: every cell of every table plans to an existing config (methods not implemented yet are listed
here one by one), a missing config fails naming the cell; --dry-run of every table needs no data and no weights and
names each missing dataset and weights file with the command that fetches it; --emit-script orders teachers before
the students that read them (bash stages, SLURM array jobs chained by afterok; parsed, and executed with a fake
interpreter and a fake sbatch) and calls the project's own interpreter; --collect averages only finished runs of one
config (hand-computed means and sample std), refuses cells whose runs disagree and flags runs that are not the
planned config."""

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import types

import pytest

from mdistiller.config import load_config
from mdistiller.engine.launch import run_name
from mdistiller.reproduce import plan as plan_module
from mdistiller.reproduce.plan import MISSING, NOT_IMPL, NOT_IMPLEMENTED, OK, UNMAPPED, plan_table, tag_suffix
from mdistiller.reproduce.table import Cell, cells_of, load_cells, table_ids
from mdistiller.utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "reproduce.py")


sys.path.insert(0, os.path.join(ROOT, "tools"))
import reproduce as tool  # noqa: E402


def reproduce(*args):
    """In process (a subprocess per call costs a torch import); errors as tools/reproduce.py prints them."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = tool.main(list(args)) or 0
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            code = e.exit_code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.parametrize("table,cells,runs", [
    ("dot-3a", 27, 26), ("dot-3b", 18, 17), ("dot-3c", 18, 18), ("dot-1", 9, 9), ("dot-2", 9, 9), ("dot-6", 14, 14),
    ("dot-7", 12, 12), ("dot-4", 6, 6), ("dot-5", 6, 6), ("kdpp-1", 90, 88), ("kdpp-2", 20, 20), ("kdpp-b3", 12, 12),
    ("dkd-a.1", 18, 18), ("mdistiller-dkd", 22, 22), ("proxy-fmnist", 13, 13), ("kdpp-b1", 18, 18),
    ("dkd-a.3", 4, 4), ("kdpp-b2", 31, 31)])
def test_dry_run_lists_every_cell(table, cells, runs):
    # A teacher row shared by several students is one run (dot-3a's resnet32x4, dot-3b's ResNet18, kdpp-1's
    # resnet32x4 and its student resnet8x4 in the ...->resnet8x4 and resnet32x4->ShuffleV* columns, ...).
    r = reproduce("--table", table, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if not line.startswith("#")]
    assert len(lines) == runs
    assert f"# {runs} runs for {cells} cells" in r.stdout
    for line in lines:
        assert os.path.isfile(os.path.join(ROOT, line.split()[0]))


def test_sweep_notes_become_overrides():
    r = reproduce("--table", "dot-1", "--dry-run")
    assert "configs/cifar100/dot/kd_resnet32x4_resnet8x4.yaml  overrides: SOLVER.DOT.DELTA -0.05  seed: 0" in r.stdout
    r = reproduce("--table", "dot-2", "--dry-run", "--seeds", "2")
    assert "configs/cifar100/kd/resnet32x4_resnet8x4.yaml  overrides: SOLVER.MOMENTUM 0.975  seed: 1" in r.stdout
    assert len([x for x in r.stdout.splitlines() if not x.startswith("#")]) == 18


def test_task_weight_sweep_and_config_values():
    # DOT tables 4/5: "alpha(task weight)=a" is CE weight a and KD weight 1 - a (DOT eq. 1). A sweep point equal
    # to the config's own value is the config's run (no overrides, no extra tag), so it is not trained twice.
    out = reproduce("--table", "dot-4", "--dry-run").stdout
    assert "configs/cifar100/kd/resnet32x4_resnet8x4.yaml  overrides: KD.LOSS.CE_WEIGHT 0.25 KD.LOSS.KD_WEIGHT 0.75" \
        in out
    assert "configs/cifar100/kd/resnet32x4_resnet8x4.yaml  overrides: -  seed: 0" in out  # alpha 0.1 is the config
    assert "KD.LOSS.CE_WEIGHT 0.1 " not in out
    out = reproduce("--table", "dot-1", "--dry-run").stdout
    assert "SOLVER.DOT.DELTA 0.075" not in out and "kd_resnet32x4_resnet8x4.yaml  overrides: -  seed: 0" in out


def test_seeds_note_caps_a_cell_and_runs_go_seed_by_seed():
    r = reproduce("--table", "proxy-fmnist", "--dry-run", "--seeds", "3")
    lines = [x for x in r.stdout.splitlines() if not x.startswith("#")]
    # the teacher, KD+DOT at delta 0 and the five one-seed baselines ("seeds=1") once, six student rows three times
    assert len(lines) == 2 + 5 + 6 * 3
    assert [x.rsplit("seed: ", 1)[1].split()[0] for x in lines] == ["0"] * 13 + ["1"] * 6 + ["2"] * 6
    assert lines[0].startswith("configs/fashion_mnist/vanilla/resnet20.yaml")


def test_not_implemented_methods_are_not_missing(monkeypatch):
    # A method of a published table without a distiller (every one has one today: a made-up name stands in): its
    # cells are reported, not looked for on disk.
    monkeypatch.setattr(plan_module, "NOT_IMPLEMENTED", {"XKD"})
    cells = [Cell("t-1", "cifar100", "resnet32x4", "resnet8x4", m, "", 70.0) for m in ("XKD", "XKD+DOT")]
    plans, runs = plan_table(cells)
    assert [p.status for p in plans] == ["not implemented"] * 2 and runs == []
    assert plans[0].reason == "XKD is not implemented in mdistiller"


# Table name of a method -> its DISTILLER.TYPE, written out here from the method modules' registry names.
FEATURE_METHODS = {"FitNet": "FITNET", "RKD": "RKD", "PKT": "PKT", "OFD": "OFD", "SRRL": "SRRL"}


@pytest.mark.parametrize("table,count", [("kdpp-1", 24), ("kdpp-2", 2), ("dot-3c", 2)])
def test_feature_method_cells_plan_to_their_configs(table, count):
    # The FitNet/RKD/PKT/OFD rows of KD++ table 1, SRRL of KD++ table 2 and OFD of DOT table 3c: each cell reads
    # configs/<dataset>/<method dir>/<teacher>_<student>.yaml, a config of that method for that very pair and
    # dataset, with no overrides (the published cells carry no note).
    cells = [c for c in load_cells() if c.table == table and c.method in FEATURE_METHODS]
    assert len(cells) == count
    plans, runs = plan_table(cells)
    assert len(runs) == count
    for p in plans:
        c = p.cell
        assert p.status == "ok" and p.overrides == ()
        assert p.config == f"configs/{c.dataset}/{c.method.lower()}/{c.teacher}_{c.student}.yaml"
        cfg = load_config(os.path.join(ROOT, p.config))
        assert cfg.DISTILLER.TYPE == FEATURE_METHODS[c.method]
        assert (cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT, cfg.DATASET.TYPE) == (c.teacher, c.student, c.dataset)


def test_missing_config_fails_naming_the_cell(tmp_path):
    root = tmp_path / "configs"
    shutil.copytree(os.path.join(ROOT, "configs"), root)
    os.remove(root / "cifar100" / "dot" / "crd_vgg13_vgg8.yaml")
    r = reproduce("--table", "dot-3a", "--dry-run", "--configs-root", str(root))
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "vgg13->vgg8 CRD+DOT" in err and "configs/cifar100/dot/crd_vgg13_vgg8.yaml does not exist" in err


def test_unknown_table_is_one_line_through_the_cli():
    r = subprocess.run([sys.executable, TOOL, "--table", "dot-99", "--dry-run"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown table 'dot-99'")
    assert len(r.stderr.strip().splitlines()) == 1



# The cells of the published tables whose method is not implemented yet (NOT_IMPLEMENTED, empty since FT, AB and
# MLKD landed), as (table, teacher, student, method). No table has one today; a cell added to the CSVs for such a
# method is listed here, so that the set of cells that cannot run is always written down.
KNOWN_NOT_IMPLEMENTED = set()


@pytest.fixture(scope="module")
def every_table():
    """{table id: cell plans} of every table of the three CSVs."""
    cells = load_cells()
    return {t: plan_table(cells_of(cells, t))[0] for t in table_ids(cells)}


def test_every_cell_of_every_table_has_a_config(every_table):
    assert len(every_table) >= 23
    not_impl = set()
    for table, plans in every_table.items():
        bad = [(p.cell.method, p.cell.note, p.status, p.reason) for p in plans if p.status in (MISSING, UNMAPPED)]
        assert bad == [], table
        for p in plans:
            assert p.status in (OK, NOT_IMPL), (table, p)
            if p.status == NOT_IMPL:
                assert p.cell.method.split("+DOT")[0] in NOT_IMPLEMENTED, (table, p.cell.method)
                not_impl.add((table, p.cell.teacher, p.cell.student, p.cell.method))
    assert not_impl == KNOWN_NOT_IMPLEMENTED


def test_new_table_mappings(every_table):
    # KD++ table B1: the margin m of appendix B.4 on the KD++ configs of its two pairs (m=0.0 is their own value)
    b1 = {(p.cell.teacher, p.cell.note): p for p in every_table["kdpp-b1"]}
    assert b1[("resnet56", "m=-0.5")].config == "configs/cifar100/kdpp/resnet56_resnet20.yaml"
    assert b1[("resnet56", "m=-0.5")].overrides == ("DINO.NORM_MARGIN", "-0.5")
    assert b1[("ResNet50", "m=2.0")].config == "configs/cifar100/kdpp/ResNet50_MobileNetV2.yaml"
    assert b1[("ResNet50", "m=2.0")].overrides == ("DINO.NORM_MARGIN", "2.0")
    assert b1[("resnet56", "m=0.0")].overrides == ()
    # DKD table A.3: TCKD alone at T 1..4 (T 4 is the config's own)
    a3 = {p.cell.note: p for p in every_table["dkd-a.3"]}
    assert {p.config for p in a3.values()} == {"configs/cifar100/tckd/wrn_40_2_wrn_16_2.yaml"}
    assert a3["temperature=1"].overrides == ("DKD.T", "1") and a3["temperature=4"].overrides == ()
    # KD++ tables 4, 4a and 5: one config folder per loss form or class centre, the full KD++ rows on kdpp/
    four = {p.cell.method: p.config for p in every_table["kdpp-4"]}
    assert four["KD + InfoNCE + SIFN"] == "configs/cifar100/kdpp_infonce_sifn/ResNet50_MobileNetV2.yaml"
    assert four["CE + KL + DINO (KD++)"] == "configs/cifar100/kdpp/ResNet50_MobileNetV2.yaml"
    five = {(p.cell.teacher, p.cell.method): p.config for p in every_table["kdpp-5"]}
    assert five[("resnet56", "KD++ (teacher classifier weights as centres)")] == \
        "configs/cifar100/kdpp_clsweight/resnet56_resnet20.yaml"
    # KD++ table 3 (detection): FitNet and FGFI have COCO configs like the other methods
    det = {(p.cell.teacher, p.cell.student, p.cell.method): p.config for p in every_table["kdpp-3"]}
    assert det[("ResNet101", "ResNet18", "FGFI")] == "configs/coco/fgfi/resnet101_resnet18.yaml"
    assert det[("ResNet50", "MobileNetV2", "FitNet")] == "configs/coco/fitnet/resnet50_mobilenet_v2.yaml"


def test_tckd_config_is_the_dkd_recipe_without_nckd():
    # DKD appendix A.4: every loss weight 1.0, so CE 1 and TCKD 1 with NCKD off; everything else (schedule, LR,
    # T, the 20-epoch warm-up of the distillation term) is the pair's DKD config.
    def leaves(node, prefix=""):
        for k, v in node.items():
            yield from leaves(v, f"{prefix}{k}.") if hasattr(v, "items") else [(f"{prefix}{k}", v)]

    tckd = dict(leaves(load_config(os.path.join(ROOT, "configs/cifar100/tckd/wrn_40_2_wrn_16_2.yaml"))))
    dkd = dict(leaves(load_config(os.path.join(ROOT, "configs/cifar100/dkd/wrn_40_2_wrn_16_2.yaml"))))
    assert {k for k in tckd if tckd[k] != dkd[k]} == {"DKD.BETA", "EXPERIMENT.TAG"}
    assert (tckd["DKD.BETA"], tckd["DKD.ALPHA"], tckd["DKD.CE_WEIGHT"]) == (0.0, 1.0, 1.0)
    assert tckd["EXPERIMENT.TAG"] == "tckd" and tckd["DKD.WARMUP"] == 20


def _missing_lines(out):
    """{(kind and what, path): fetch command} of a dry run's '# missing ...' lines."""
    found = {}
    for line in out.splitlines():
        if line.startswith("# missing "):
            head, fetch = line[len("# missing "):].split("; fetch: ", 1)
            what, path = head.split(": ", 1)
            found[(what, path.rsplit(" (", 1)[0])] = fetch
    return found


def test_dry_run_of_every_table_needs_no_data_or_weights(tmp_path, monkeypatch):
    # A machine with nothing: no dataset under the (relative) DATASET.ROOTs, no teacher zoo, empty torch and Hugging
    # Face caches. Every table still plans (exit 0) and lists what to fetch, each with its command.
    work, ckpts, torch_home, hf = (tmp_path / n for n in ("work", "ckpts", "torch", "hf"))
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MDISTILLER_CKPT_DIR", str(ckpts))
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hub = torch_home / "hub" / "checkpoints"
    cells = load_cells()
    missing = {}
    for table in table_ids(cells):
        r = reproduce("--table", table, "--dry-run")
        assert r.returncode == 0, (table, r.stderr)
        n = len(cells_of(cells, table)) - sum(k[0] == table for k in KNOWN_NOT_IMPLEMENTED)
        assert f" runs for {n} cells of table {table};" in r.stdout, table
        missing[table] = _missing_lines(r.stdout)
        assert all(fetch.strip() for fetch in missing[table].values()), table
    cifar = ("dataset CIFAR-100", os.path.join("data", "cifar-100-python") + os.sep)
    for table in ("dot-3a", "kdpp-1", "kdpp-4", "kdpp-5", "kdpp-b1", "dkd-a.3"):
        assert "torchvision.datasets.CIFAR100('data', download=True)" in missing[table][cifar], table
    assert missing["dkd-a.3"][("teacher checkpoint wrn_40_2 (cifar100)", str(
        ckpts / "cifar_teachers" / "wrn_40_2_vanilla" / "ckpt_epoch_240.pth"))] == "bash download_ckpts.sh"
    # ImageNet: torchvision teachers (download_ckpts.sh fetches ResNet18/34/50), timm's ViTs in the hub cache
    b2 = missing["kdpp-b2"]
    assert b2[("teacher checkpoint ResNet34 (imagenet)", str(hub / "resnet34-b627a593.pth"))] == \
        "bash download_ckpts.sh imagenet"
    assert "torch.hub.load_state_dict_from_url('https://download.pytorch.org/models/resnet101-63fe2227.pth')" in \
        b2[("teacher checkpoint ResNet101 (imagenet)", str(hub / "resnet101-63fe2227.pth"))]
    vit = [(k, v) for k, v in b2.items() if k[0] == "teacher weights timm:vit_small_patch16_224"]
    assert len(vit) == 1 and str(hf / "hub" / "models--timm--vit_small_patch16_224") in vit[0][0][1]
    assert "timm.create_model('vit_small_patch16_224', pretrained=True)" in vit[0][1]
    assert any(k[0] == "dataset ImageNet-1k" and "prepare_imagenet_val.py" in v for k, v in b2.items())
    # Tiny-ImageNet: the archive and the script that sorts its val/; the teacher is trained or put in place
    assert "tiny-imagenet-200.zip" in missing["dot-3b"][("dataset Tiny-ImageNet", os.path.join(
        "data", "tiny-imagenet-200") + os.sep)]
    assert "tools/train.py" in missing["dot-3b"][("teacher checkpoint ResNet18 (tiny_imagenet)", str(
        ckpts / "tiny_imagenet_teachers" / "ResNet18_vanilla" / "ti_res18"))]
    # detection: COCO and the students' ImageNet backbones; the teachers are runs of the plan, not missing
    det = missing["kdpp-3"]
    assert "images.cocodataset.org" in det[("dataset COCO 2017", os.path.join("data", "coco") + os.sep)]
    assert det[("backbone weights resnet18 (ImageNet)", str(hub / "resnet18-f37072fd.pth"))] == \
        "bash download_ckpts.sh imagenet"
    assert not [k for k in det if k[0].startswith("teacher")]
    # the proxy table's students read the teacher it trains: nothing to fetch but (maybe) Fashion-MNIST
    assert not [k for k in missing["proxy-fmnist"] if not k[0].startswith("dataset Fashion-MNIST")]


def test_list_shows_every_implemented_cell_with_a_config():
    r = reproduce("--list")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in r.stdout.splitlines()[1:]}
    assert set(rows) == set(table_ids(load_cells()))
    for table, (cells, with_config, not_impl, missing) in rows.items():
        assert cells == with_config + not_impl + missing, table
        assert missing == 0, table
        assert not_impl == sum(k[0] == table for k in KNOWN_NOT_IMPLEMENTED), table
    assert rows["proxy-fmnist"] == [13, 13, 0, 0]
    # every published cell of these three tables has a config (FitNet, RKD, PKT, OFD, SRRL rows included)
    assert rows["kdpp-1"] == [90, 90, 0, 0] and rows["kdpp-2"] == [20, 20, 0, 0] and rows["dot-3c"] == [18, 18, 0, 0]
    # KD++ table B2: ResNet and ViT (timm) teachers into ResNet18, baselines included
    assert rows["kdpp-b2"] == [31, 31, 0, 0]


# ---------------------------------------------------------------- scripts

# The proxy table's students read the resnet20 teacher's run by default (mdistiller/models/teacher_ckpt.py docstring:
# <LOG.PREFIX>/<dataset>_none_<teacher>_vanilla_seed0/student_best.pth).
TEACHER_RUN = "fashion_mnist_none_resnet20_vanilla_seed0"
TEACHER_CFG = "configs/fashion_mnist/vanilla/resnet20.yaml"

FAKE_PYTHON = """#!/usr/bin/env bash
# Records its arguments; as the teacher run it fails, or finishes without summary.json, or finishes, per FAKE_TEACHER.
echo "$*" >> "$FAKE_LOG"
case "$*" in
  *vanilla/resnet20.yaml*)
    case "${FAKE_TEACHER:-ok}" in
      fail) exit 3 ;;
      ok) mkdir -p "$FAKE_TEACHER_DIR" && echo '{}' > "$FAKE_TEACHER_DIR/summary.json" ;;
    esac ;;
esac
"""

FAKE_SBATCH = """#!/usr/bin/env bash
# Records each submission's options and script (stdin); prints a job id the way --parsable does (JOBID;CLUSTER).
n=$(( $(ls "$FAKE_SBATCH_DIR" | grep -c '^args') + 1 ))
printf '%s\\n' "$@" > "$FAKE_SBATCH_DIR/args$n"
cat > "$FAKE_SBATCH_DIR/script$n"
echo "$((100 + n));cluster0"
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def _emit(tmp_path, table, *flags, seeds=2):
    path = tmp_path / "run.sh"
    r = reproduce("--table", table, "--seeds", str(seeds), "--prefix", str(tmp_path / "runs"), "--emit-script",
                  str(path), *flags)
    assert r.returncode == 0, r.stderr
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    return path.read_text()


def _heredocs(text):
    """{stage number: (sbatch options, script body)} of a SLURM driver, from its `stageN=$(sbatch ... <<'TAG'`."""
    out, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("stage") and "=$(sbatch " in line:
            n = int(line[len("stage"):line.index("=")])
            options, tag = line.split("=$(sbatch ", 1)[1].split(" <<'")
            tag = tag.rstrip("'")
            end = lines.index(tag, i + 1)
            out[n] = (options.split(), "\n".join(lines[i + 1:end]) + "\n")
    return out


def _case_arms(body):
    """[(task id, [commands])] of an array script's case statement."""
    arms = []
    for line in body.splitlines():
        head, _, rest = line.strip().partition(") ")
        if head.isdigit():
            arms.append((int(head), [c.strip() for c in rest.rstrip(";").strip().split("; ")]))
    return arms


def test_slurm_driver_submits_teachers_first_and_students_after_them(tmp_path):
    python = _executable(tmp_path / "python", FAKE_PYTHON)
    text = _emit(tmp_path, "proxy-fmnist", "--slurm", "--python", python, "--time", "01:30:00", "--partition",
                 "gpu-long", "--cpus-per-task", "5", "--output", str(tmp_path / "logs" / "%x_%A_%a.out"),
                 "--sbatch-arg=--account=kd")
    stages = _heredocs(text)
    assert sorted(stages) == [1, 2]
    # stage 1 is submitted first, with --parsable; stage 2 carries afterok on stage 1's id
    assert text.index("stage1=$(sbatch") < text.index("stage2=$(sbatch")
    assert stages[1][0] == ["--parsable"]
    assert "--parsable" in stages[2][0] and "--dependency=afterok:${stage1}" in stages[2][0]
    assert 'stage1="${stage1%%;*}"' in text  # the id without the cluster name
    for n, (_, body) in stages.items():
        assert subprocess.run(["bash", "-n"], input=body, text=True).returncode == 0
        sbatch = [x for x in body.splitlines() if x.startswith("#SBATCH ")]
        for line in ("#SBATCH --time=01:30:00", "#SBATCH --partition=gpu-long", "#SBATCH --cpus-per-task=5",
                     f"#SBATCH --output={tmp_path}/logs/%x_%A_%a.out", "#SBATCH --account=kd",
                     "#SBATCH --gres=gpu:1", f"#SBATCH --job-name=repro-proxy-fmnist-s{n}"):
            assert line in sbatch, (n, line)
    teacher_arms, student_arms = _case_arms(stages[1][1]), _case_arms(stages[2][1])
    assert [i for i, _ in teacher_arms] == [0] and "#SBATCH --array=0-0" in stages[1][1]
    assert teacher_arms[0][1] == [f"{python} tools/train.py --cfg {TEACHER_CFG} --resume EXPERIMENT.SEED 0 "
                                  f"LOG.PREFIX {tmp_path}/runs"]
    # 18 students: 6 methods x 2 seeds + KD+DOT at delta 0 and 5 baselines once; each checks the teacher run first
    assert [i for i, _ in student_arms] == list(range(18)) and "#SBATCH --array=0-17" in stages[2][1]
    for _, (guard, cmd) in student_arms:
        assert guard == f"require_finished {tmp_path}/runs/{TEACHER_RUN}"
        assert cmd.startswith(f"{python} tools/train.py --cfg configs/fashion_mnist/") and TEACHER_CFG not in cmd
    # run the driver against a fake sbatch: two submissions, the second after the first's id
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    _executable(fake_bin / "sbatch", FAKE_SBATCH)
    (tmp_path / "sb").mkdir()
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", FAKE_SBATCH_DIR=str(tmp_path / "sb"))
    r = subprocess.run(["bash", str(tmp_path / "run.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    args = [(tmp_path / "sb" / f"args{n}").read_text().split() for n in (1, 2)]
    assert args[0] == ["--parsable"]
    assert args[1] == ["--parsable", "--dependency=afterok:101", "--kill-on-invalid-dep=yes"]
    assert (tmp_path / "sb" / "script2").read_text() == stages[2][1]
    assert (tmp_path / "logs").is_dir()  # SLURM does not create the --output directory itself


def test_slurm_student_task_refuses_an_unfinished_teacher(tmp_path):
    # Even started by hand (no afterok), a student task stops before training while its teacher has no summary.json.
    python = _executable(tmp_path / "python", FAKE_PYTHON)
    stages = _heredocs(_emit(tmp_path, "proxy-fmnist", "--slurm", "--python", python))
    log = tmp_path / "calls.log"
    env = dict(os.environ, FAKE_LOG=str(log), FAKE_TEACHER_DIR=str(tmp_path / "runs" / TEACHER_RUN))

    def task(stage, i):
        return subprocess.run(["bash", "-s"], input=stages[stage][1], text=True, capture_output=True,
                              env=dict(env, SLURM_ARRAY_TASK_ID=str(i)))

    r = task(2, 3)
    assert r.returncode == 1 and "has not finished" in r.stderr and not log.exists()
    assert task(1, 0).returncode == 0
    assert task(2, 3).returncode == 0
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and TEACHER_CFG in calls[0] and "configs/fashion_mnist/" in calls[1]


@pytest.mark.parametrize("teacher,rc,students_run", [("ok", 0, 18), ("fail", 3, 0), ("no-summary", 1, 0)])
def test_bash_script_runs_the_teacher_stage_first(tmp_path, teacher, rc, students_run):
    python = _executable(tmp_path / "python", FAKE_PYTHON)
    text = _emit(tmp_path, "proxy-fmnist", "--python", python)
    lines = text.splitlines()
    runs = [i for i, x in enumerate(lines) if x.startswith(f"{python} tools/train.py")]
    teacher_lines = [i for i in runs if TEACHER_CFG in lines[i]]
    assert len(runs) == 19 and len(teacher_lines) == 1
    assert teacher_lines[0] < min(i for i in runs if i not in teacher_lines)
    assert "set -euo pipefail" in lines
    log = tmp_path / "calls.log"
    env = dict(os.environ, FAKE_LOG=str(log), FAKE_TEACHER=teacher,
               FAKE_TEACHER_DIR=str(tmp_path / "runs" / TEACHER_RUN))
    r = subprocess.run(["bash", str(tmp_path / "run.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == rc, r.stderr
    calls = log.read_text().splitlines()
    assert TEACHER_CFG in calls[0] and len(calls) == 1 + students_run
    if teacher == "no-summary":
        assert f"teacher run {tmp_path}/runs/{TEACHER_RUN} has not finished" in r.stderr


def test_several_processes_use_torchrun_next_to_the_interpreter(tmp_path):
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    python = _executable(venv / "python", "#!/bin/sh\n")
    text = _emit(tmp_path, "dot-1", "--python", python, "--nproc", "4", "--slurm", seeds=1)
    arms = _case_arms(_heredocs(text)[1][1])
    assert len(arms) == 9 and all(c[0].startswith(f"{python} -m torch.distributed.run --standalone "
                                                  "--nproc_per_node=4 tools/train.py --cfg ") for _, c in arms)
    assert "#SBATCH --gres=gpu:4" in text
    # CIFAR-100 (an in-memory dataset, DATASET.NUM_WORKERS default 2): 4 processes x (2 workers + 1)
    assert "#SBATCH --cpus-per-task=12" in text
    _executable(venv / "torchrun", "#!/bin/sh\n")
    text = _emit(tmp_path, "dot-1", "--python", python, "--nproc", "2", "--gpus", "0", "--slurm", seeds=1)
    arms = _case_arms(_heredocs(text)[1][1])
    assert len(arms) == 9
    assert all(c[0].startswith(f"{venv}/torchrun --standalone --nproc_per_node=2 ") for _, c in arms)
    assert "gres" not in text  # a CPU-only job
    text = _emit(tmp_path, "dot-1", "--python", python, "--nproc", "2", seeds=1)
    runs = [x for x in text.splitlines() if "tools/train.py" in x]
    assert len(runs) == 9 and all(x.startswith(f"{venv}/torchrun --standalone --nproc_per_node=2 ") for x in runs)


def test_default_interpreter_is_the_projects(tmp_path):
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    expected = venv if os.path.isfile(venv) else os.path.abspath(sys.executable)
    text = _emit(tmp_path, "dot-1", seeds=1)
    runs = [x for x in text.splitlines() if "tools/train.py" in x]
    assert len(runs) == 9 and all(x.startswith(f"{expected} tools/train.py --cfg ") for x in runs)
    assert f"cd {ROOT}" in text.splitlines()


def test_published_teachers_need_no_stage(tmp_path):
    # dot-3a trains its teacher rows too, but the students read the published CIFAR-100 teachers, not those runs:
    # one array job, no dependency, no teacher check.
    text = _emit(tmp_path, "dot-3a", "--slurm", seeds=1)
    stages = _heredocs(text)
    assert list(stages) == [1] and stages[1][0] == ["--parsable"] and "require_finished" not in text
    assert len(_case_arms(stages[1][1])) == 26


def test_script_flags_without_their_mode_are_errors(tmp_path):
    r = reproduce("--table", "dot-1", "--dry-run", "--time", "1:00:00")
    assert r.returncode == 2 and "--time: only with --emit-script PATH --slurm" in r.stderr
    r = reproduce("--table", "dot-1", "--emit-script", str(tmp_path / "x.sh"), "--partition", "p")
    assert r.returncode == 2 and not (tmp_path / "x.sh").exists()
    r = reproduce("--table", "dot-1", "--dry-run", "--nproc", "2")
    assert r.returncode == 2 and "--nproc: only with --emit-script PATH" in r.stderr


def test_run_here_trains_the_teacher_first(tmp_path, monkeypatch):
    # In-process runs follow the stages too: a table listing its teacher row last still trains it first.
    from mdistiller.engine import launch

    results = tmp_path / "t.csv"
    results.write_text("source,table,dataset,teacher,student,method,top1,top5,note\n"
                       "mdistiller proxy,x,fashion_mnist,resnet20,resnet8,KD,,,\n"
                       "mdistiller proxy,x,fashion_mnist,resnet20,resnet8,DKD,,,\n"
                       "mdistiller proxy,x,fashion_mnist,resnet20,resnet8,teacher,,,seeds=1\n")
    order = []
    monkeypatch.setattr(launch, "train_from_config",
                        lambda cfg, resume: order.append((cfg.DISTILLER.TYPE, cfg.EXPERIMENT.SEED)))
    r = reproduce("--table", "proxy-x", "--results", str(results), "--seeds", "2", "--prefix", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert order == [("NONE", 0), ("KD", 0), ("DKD", 0), ("KD", 1), ("DKD", 1)]


def test_dry_run_names_the_teacher_a_student_waits_for():
    out = reproduce("--table", "proxy-fmnist", "--dry-run").stdout
    kd = [x for x in out.splitlines() if x.startswith("configs/fashion_mnist/kd/")]
    assert kd == [f"configs/fashion_mnist/kd/resnet20_resnet8.yaml  overrides: -  seed: 0  after: {TEACHER_RUN}"]
    assert "2 stages (teachers first)" in out


# ---------------------------------------------------------------- collect

def _write_run(prefix, config, overrides=(), seed=0, best=None, last=None, world_size=1, extra=(), finished=True,
               teacher_sha=None):
    """A run directory as the trainer leaves it: config.yaml (cfg.dump()), metrics.jsonl, and once finished
    summary.json with the keys SummaryHook and launch.py write (the ones collect reads among them)."""
    opts = list(overrides) + ["EXPERIMENT.SEED", str(seed), "LOG.PREFIX", str(prefix)]
    if overrides:
        opts += ["EXPERIMENT.TAG", tag_suffix(overrides)]
    cfg = load_config(os.path.join(ROOT, config), opts + list(extra))
    d = prefix / run_name(cfg)
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(cfg.dump())
    epochs = cfg.SOLVER.EPOCHS if finished else cfg.SOLVER.EPOCHS - 1
    (d / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "test_top1": best}) + "\n"
                                             for e in range(1, epochs + 1)))
    if finished:
        (d / "summary.json").write_text(json.dumps({
            "best_top1": best, "best_top5": 99.0, "best_epoch": epochs, "last_top1": last, "last_top5": 99.0,
            "epochs": epochs, "seed": seed, "world_size": world_size, "run_dir": str(d),
            "teacher": None if teacher_sha is None else {"name": cfg.DISTILLER.TEACHER, "sha256": teacher_sha,
                                                         "checkpoint": "/x/teacher.pth", "top1": None}}))
    return d


def _collect(prefix, table, *flags, tmp_path):
    out_csv = tmp_path / "t.csv"
    r = reproduce("--table", table, "--collect", "--prefix", str(prefix), "--out-csv", str(out_csv), *flags)
    rows = list(csv.DictReader(open(out_csv))) if out_csv.exists() else []
    return r, rows


KD = "configs/fashion_mnist/kd/resnet20_resnet8.yaml"


def test_collect_means_and_sample_std(tmp_path):
    prefix = tmp_path / "runs"
    kd = "configs/cifar100/kd/resnet32x4_resnet8x4.yaml"
    # momentum 0.9 (the config's own value, so its own run): best 73, 74, 75 -> mean 74, sample std 1;
    # last 72, 72, 75 -> mean 73, std sqrt(3) = 1.732
    for seed, (best, last) in enumerate([(73.0, 72.0), (74.0, 72.0), (75.0, 75.0)]):
        _write_run(prefix, kd, (), seed, best, last)
    # momentum 0.81: one seed -> std undefined
    _write_run(prefix, kd, ("SOLVER.MOMENTUM", "0.81"), 0, 70.5, 70.0)
    # a run of another sweep point with seed 10 must not leak into 0.9 (run-name prefix match)
    _write_run(prefix, kd, ("SOLVER.MOMENTUM", "0.95"), 10, 10.0, 10.0)
    md, out_csv = tmp_path / "t.md", tmp_path / "t.csv"
    r = reproduce("--table", "dot-2", "--collect", "--prefix", str(prefix), "--out-md", str(md), "--out-csv",
                  str(out_csv))
    assert r.returncode == 0, r.stderr
    rows = {row["note"]: row for row in csv.DictReader(open(out_csv))}
    m9 = rows["momentum=0.9"]
    assert (m9["n"], m9["best_mean"], m9["best_std"], m9["last_mean"], m9["last_std"], m9["status"]) == (
        "3", "74.00", "1.00", "73.00", "1.73", "ok")
    assert m9["paper"] == "73.33" and m9["diff"] == "0.67"
    m81 = rows["momentum=0.81"]
    assert (m81["n"], m81["best_mean"], m81["best_std"], m81["diff"]) == ("1", "70.50", "", "-3.03")
    assert rows["momentum=0.95"]["seeds"] == "10" and rows["momentum=0.95"]["best_mean"] == "10.00"
    assert rows["momentum=0.99"]["status"] == "missing runs" and rows["momentum=0.99"]["best_mean"] == ""
    text = md.read_text()
    assert "| 74.00 ± 1.00 | 73.00 ± 1.73 | 73.33 | +0.67 |" in text and "sample std (n-1)" in text
    assert "| missing | missing | 37.19 |" in text


def test_collect_refuses_a_cell_whose_runs_disagree(tmp_path):
    # The case: runs named like the cell's (the name carries neither epochs, nor subset, nor processes)
    # but of different schedules, subsets and process counts must not become one "n=5" mean.
    prefix = tmp_path / "runs"
    for seed, best in enumerate([83.0, 84.5, 86.0]):
        _write_run(prefix, KD, seed=seed, best=best, last=best)
    _write_run(prefix, KD, seed=3, best=60.0, last=60.0,
               extra=["SOLVER.EPOCHS", "1", "SOLVER.LR_DECAY_STAGES", "[1]"])
    _write_run(prefix, KD, seed=4, best=70.0, last=70.0, world_size=2, extra=["DATASET.TRAIN_SUBSET", "2000"])
    r, rows = _collect(prefix, "proxy-fmnist", tmp_path=tmp_path)
    assert r.returncode == 1
    kd = [x for x in rows if x["method"] == "KD"][0]
    assert kd["status"].startswith("refused: 3 + 1 + 1 runs of 3 different configs")
    assert "(DATASET.TRAIN_SUBSET 10000 vs 2000, SOLVER.EPOCHS 4 vs 1, SOLVER.LR_DECAY_STAGES [3] vs [1], " \
        "world_size 1 vs 2); not averaged" in kd["status"]
    assert (kd["n"], kd["best_mean"], kd["last_mean"]) == ("0", "", "")
    assert "KD: refused: 3 + 1 + 1 runs" in r.stderr and "1 cell(s) refused" in r.stderr
    md = reproduce("--table", "proxy-fmnist", "--collect", "--prefix", str(prefix)).stdout
    assert [x for x in md.splitlines() if "| KD |  |" in x][0].startswith(
        "| resnet20 | resnet8 | KD |  | 0 | refused | refused | - |  | refused: ")


def test_collect_counts_each_seed_of_one_config_once(tmp_path):
    prefix = tmp_path / "runs"
    # three seeds of the planned config; logging, device and loader settings differ and do not matter
    for seed, best, extra in [(0, 83.0, []), (1, 84.5, ["LOG.TENSORBOARD_FREQ", "0", "DATASET.NUM_WORKERS", "7"]),
                              (2, 86.0, ["EXPERIMENT.DEVICE", "cpu", "SPEED.CHANNELS_LAST", "on"])]:
        _write_run(prefix, KD, seed=seed, best=best, last=best - 1, extra=extra)
    # seed 1 again under another name: the same experiment, counted once
    _write_run(prefix, KD, seed=1, best=99.0, last=99.0, extra=["EXPERIMENT.NAME", "my_kd_copy"])
    # seed 3 stopped before its last epoch (no summary.json): left out, and said so
    _write_run(prefix, KD, seed=3, finished=False)
    r, rows = _collect(prefix, "proxy-fmnist", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    kd = [x for x in rows if x["method"] == "KD"][0]
    # by hand: best 83.0, 84.5, 86.0 -> mean 84.5, deviations -1.5, 0, 1.5 -> sample std sqrt(4.5 / 2) = 1.5
    assert (kd["n"], kd["seeds"], kd["best_mean"], kd["best_std"], kd["last_mean"], kd["last_std"]) == (
        "3", "0 1 2", "84.50", "1.50", "83.50", "1.50")
    assert kd["status"].startswith("ok; ")
    assert "1 unfinished run(s) left out (seed 3)" in kd["status"]
    assert "seed 1 twice (" in kd["status"] and "counted once" in kd["status"]
    assert len(kd["config_key"]) == 10


def test_collect_flags_runs_that_are_not_the_planned_config(tmp_path):
    prefix = tmp_path / "runs"
    for seed, best in enumerate([50.0, 52.0]):
        _write_run(prefix, KD, seed=seed, best=best, last=best, extra=["DATASET.TRAIN_SUBSET", "500"])
    r, rows = _collect(prefix, "proxy-fmnist", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    kd = [x for x in rows if x["method"] == "KD"][0]
    assert (kd["n"], kd["best_mean"], kd["best_std"]) == ("2", "51.00", "1.41")
    assert kd["status"] == "flagged: not the planned config (DATASET.TRAIN_SUBSET 500 vs 10000; runs vs plan)"


def test_collect_ignore_key_and_its_errors(tmp_path):
    prefix = tmp_path / "runs"
    _write_run(prefix, KD, seed=0, best=80.0, last=80.0)
    _write_run(prefix, KD, seed=1, best=82.0, last=82.0, extra=["DISTILLER.TEACHER_CKPT", "/elsewhere/t.pth"])
    r, rows = _collect(prefix, "proxy-fmnist", tmp_path=tmp_path)
    kd = [x for x in rows if x["method"] == "KD"][0]
    assert r.returncode == 1 and 'DISTILLER.TEACHER_CKPT "" vs "/elsewhere/t.pth"' in kd["status"]
    r, rows = _collect(prefix, "proxy-fmnist", "--ignore-key", "DISTILLER.TEACHER_CKPT", tmp_path=tmp_path)
    kd = [x for x in rows if x["method"] == "KD"][0]
    assert r.returncode == 0 and (kd["n"], kd["best_mean"], kd["status"]) == ("2", "81.00", "ok")
    r = reproduce("--table", "proxy-fmnist", "--collect", "--prefix", str(prefix), "--ignore-key", "SOLVER.LRR")
    assert r.returncode == 2 and "--ignore-key SOLVER.LRR: not a config key" in r.stderr
    r = reproduce("--table", "proxy-fmnist", "--collect", "--prefix", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and "is not a directory" in r.stderr


@pytest.mark.slow
def test_collect_reads_a_real_run(tmp_path):
    # A real (tiny) training run as tools/train.py leaves it, beside a fabricated 2-process run of the same config.
    from mdistiller.engine.launch import train_from_config

    prefix = tmp_path / "runs"
    tiny = ["DATASET.TRAIN_SUBSET", "100", "DATASET.TEST_SUBSET", "50", "SOLVER.EPOCHS", "1",
            "SOLVER.LR_DECAY_STAGES", "[1]", "EXPERIMENT.DEVICE", "cpu"]
    cfg = load_config(os.path.join(ROOT, TEACHER_CFG), tiny + ["LOG.PREFIX", str(prefix)])
    summary = train_from_config(cfg)
    metrics = [json.loads(x) for x in open(prefix / TEACHER_RUN / "metrics.jsonl")]
    r, rows = _collect(prefix, "proxy-fmnist", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    teacher = [x for x in rows if x["method"] == "teacher"][0]
    assert (teacher["n"], teacher["seeds"]) == ("1", "0")
    assert teacher["best_mean"] == f"{max(m['test_top1'] for m in metrics):.2f}"
    assert summary["world_size"] == 1
    assert teacher["status"].startswith("flagged: not the planned config (")
    assert "SOLVER.EPOCHS 1 vs 4" in teacher["status"] and "DATASET.TRAIN_SUBSET 100 vs 10000" in teacher["status"]
    _write_run(prefix, TEACHER_CFG, seed=1, best=10.0, last=10.0, world_size=2, extra=tiny)
    r, rows = _collect(prefix, "proxy-fmnist", tmp_path=tmp_path)
    teacher = [x for x in rows if x["method"] == "teacher"][0]
    assert r.returncode == 1 and teacher["status"] == (
        "refused: 1 + 1 runs of 2 different configs (world_size 1 vs 2); not averaged")


def test_collect_teacher_row_reports_the_checkpoint(tmp_path):
    prefix = tmp_path / "runs"
    # the KD run of the plain config (the run name does not depend on the checkpoint), with its own teacher
    _write_run(prefix, "configs/cifar100/kd/resnet32x4_resnet8x4.yaml", best=74.0, last=73.0,
               extra=["DISTILLER.TEACHER_CKPT", "/ckpts/r32x4.pth"])
    r = reproduce("--table", "dot-3a", "--collect", "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    teacher = [x for x in r.stdout.splitlines() if "| resnet32x4 | resnet8x4 | teacher |" in x]
    assert len(teacher) == 1 and "teacher used: /ckpts/r32x4.pth" in teacher[0]
    kd = [x for x in r.stdout.splitlines() if "| resnet32x4 | resnet8x4 | KD |" in x][0]
    assert 'flagged: not the planned config (DISTILLER.TEACHER_CKPT "/ckpts/r32x4.pth" vs ""' in kd


def test_collect_proxy_table_has_no_paper_number(tmp_path):
    prefix = tmp_path / "runs"
    _write_run(prefix, TEACHER_CFG, best=88.0, last=87.5)
    for seed, best in enumerate([85.0, 86.0]):
        _write_run(prefix, KD, seed=seed, best=best, last=best)
    r = reproduce("--table", "proxy-fmnist", "--collect", "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    kd = [x for x in r.stdout.splitlines() if "| resnet20 | resnet8 | KD |" in x]
    assert kd == ["| resnet20 | resnet8 | KD |  | 2 | 85.50 ± 0.71 | 85.50 ± 0.71 | - |  | ok |"]
    teacher = [x for x in r.stdout.splitlines() if "| resnet8 | teacher |" in x][0]
    assert "| 88.00 | 87.50 | - |" in teacher
    assert f"{TEACHER_RUN}/student_best.pth" in teacher  # the default teacher location


def test_collect_keys_the_teacher_by_its_recorded_hash_not_its_path(tmp_path):
    # The same teacher file at two paths is one teacher: its runs are averaged. A teacher retrained into the same
    # path is another teacher: the cell is refused, naming the two hashes.
    same = "ab" * 32
    prefix = tmp_path / "same"
    _write_run(prefix, KD, seed=0, best=80.0, last=80.0, teacher_sha=same,
               extra=["DISTILLER.TEACHER_CKPT", "/data/a/teacher.pth"])
    _write_run(prefix, KD, seed=1, best=82.0, last=82.0, teacher_sha=same,
               extra=["DISTILLER.TEACHER_CKPT", "/mirror/b/teacher.pth"])
    _, rows = _collect(prefix, "proxy-fmnist", tmp_path=tmp_path)
    kd = [x for x in rows if x["method"] == "KD"][0]
    assert (kd["n"], kd["best_mean"]) == ("2", "81.00")
    assert not kd["status"].startswith("refused") and "TEACHER_CKPT" not in kd["status"]
    prefix = tmp_path / "retrained"
    _write_run(prefix, KD, seed=0, best=80.0, last=80.0, teacher_sha="cd" * 32)
    _write_run(prefix, KD, seed=1, best=82.0, last=82.0, teacher_sha="ef" * 32)
    r, rows = _collect(prefix, "proxy-fmnist", tmp_path=tmp_path)
    kd = [x for x in rows if x["method"] == "KD"][0]
    assert r.returncode == 1 and kd["status"].startswith("refused: 1 + 1 runs of 2 different configs")
    assert f'teacher_sha256 "{"cd" * 8}" vs "{"ef" * 8}"' in kd["status"]
