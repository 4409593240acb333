#!/usr/bin/env bash
# bench/gpu_check.sh: check vitpipe on one GPU node in about 10 minutes, with no package registry.
# `bench/gpu_check.sh --help` says what it does; README.md ("GPU check") how to fill --wheels DIR.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/gpu_check.sh [options] [-- options for bench/gpu_check.py]

Checks vitpipe's trainer and model on the GPUs of this machine. Needs CUDA PyTorch; installs what
else is missing from a folder of wheels (no registry needed). Phases, with their time on one
H100/H200 (estimates):

  environment   python3 has torch and torch.cuda.is_available(); counts the GPUs        ~5 s
  wheels        with --wheels: installs the wheels whose project is missing or older
                (pip --no-index --no-deps --target WORK/site, put on PYTHONPATH;
                the system's own packages, torch included, are never touched)         ~15 s
  imports       deepspeed, pydantic, yaml, tqdm, safetensors, PIL, numpy import         ~10 s
  train         torchrun, NCCL, one rank per GPU, no Ray: bench/gpu_check.py trains
                ViT-B/16 at 224 px in bf16 on synthetic shards it makes, ZeRO-1 then
                ZeRO-3, 200 steps each + a crash and resume of the last 50; asserts the
                loss falls and the resume is exact; records images/s, MFU, data-wait
                fraction and peak memory                                               ~4 min
  mfu           bench/gpu_mfu.py: B/16, L/16, H/14 vs timm, bf16, eager                 ~1.5 min
  mfu_compiled  the same with torch.compile (compilation dominates)                      ~4 min
  ray           only when `import ray` works: the pretrain stage through Ray Train
                (vitpipe run of a generated two-stage config)                          ~1.5 min

Results (JSON) in OUT: gpu_check.json (this summary), gpu_check_train.json, gpu_mfu_eager.json,
gpu_mfu_compiled.json, gpu_check_ray.json; each phase's log in OUT/gpu_check_logs/.
Exit status 0 when every phase that ran passed, 1 when one failed, 2 for a usage error.

options:
  --wheels DIR        install missing packages from the wheels in DIR (see README.md, "GPU check")
  --out DIR           where results go (default: bench/out)
  --work DIR          shards (cached between runs), training folders, installed wheels
                      (default: OUT/gpu_check_work)
  --quick             about 4 minutes: 60 training steps, gpu_mfu on B/16 only with short rounds
  --steps N           training steps per ZeRO stage (default: 200; 60 with --quick)
  --nproc N           ranks for the train phase (default: the number of GPUs; 2 with --device cpu)
  --device cpu        a CPU smoke run of every phase (gloo, a tiny model, gpu_mfu's CPU smoke)
  --peak-tflops X     the card's dense bf16 peak for MFU (default: known by name: H100, H200, A100)
  --skip-mfu          skip both gpu_mfu phases
  --skip-compile      skip the torch.compile gpu_mfu phase
  --skip-ray          skip the Ray Train phase even when Ray is importable
  --env-only          stop after the imports phase (checks a wheel folder in seconds)
  --phase-timeout S   stop a phase that runs longer than S seconds (default: 1200)
  --python PY         the interpreter (default: $PYTHON, else python3)
  -h, --help          this text
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="" WORK="" WHEELS="" DEVICE="cuda" NPROC="" STEPS="" PEAK=""
QUICK=0 SKIP_MFU=0 SKIP_COMPILE=0 SKIP_RAY=0 ENV_ONLY=0 PHASE_TIMEOUT=1200
PASS_THROUGH=()

usage_error() {
  echo "gpu_check: error: $1 (see --help)" >&2
  exit 2
}

value() {  # value FLAG "$@": the option's argument, or a usage error
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || usage_error "$1 needs a value"
  printf '%s' "$2"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --wheels) WHEELS="$(value "$@")"; shift 2 ;;
    --out) OUT="$(value "$@")"; shift 2 ;;
    --work) WORK="$(value "$@")"; shift 2 ;;
    --steps) STEPS="$(value "$@")"; shift 2 ;;
    --nproc) NPROC="$(value "$@")"; shift 2 ;;
    --device) DEVICE="$(value "$@")"; shift 2 ;;
    --peak-tflops) PEAK="$(value "$@")"; shift 2 ;;
    --phase-timeout) PHASE_TIMEOUT="$(value "$@")"; shift 2 ;;
    --python) PYTHON="$(value "$@")"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --skip-mfu) SKIP_MFU=1; shift ;;
    --skip-compile) SKIP_COMPILE=1; shift ;;
    --skip-ray) SKIP_RAY=1; shift ;;
    --env-only) ENV_ONLY=1; shift ;;
    --) shift; PASS_THROUGH=("$@"); break ;;
    *) usage_error "unknown option $1" ;;
  esac
done
[[ "$DEVICE" == cuda || "$DEVICE" == cpu ]] || usage_error "--device must be cuda or cpu, got $DEVICE"
for pair in "--steps:$STEPS" "--nproc:$NPROC" "--phase-timeout:$PHASE_TIMEOUT"; do
  [[ -z "${pair#*:}" || "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || usage_error "${pair%%:*} must be a positive integer"
done
[[ -z "$WHEELS" || -d "$WHEELS" ]] || usage_error "--wheels $WHEELS is not a directory"

cd "$REPO"  # the Python commands below name files relative to the repository
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="${WORK:-$OUT/gpu_check_work}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
LOGS="$OUT/gpu_check_logs"
mkdir -p "$LOGS"
# One line per phase: name, status, seconds, reason, result file, separated by the ASCII unit
# separator (not a tab: `read` would merge the tabs around an empty field).
SEP=$'\x1f'
PHASE_FILE="$WORK/phases.txt"
: > "$PHASE_FILE"
VERSIONS_FILE="$WORK/versions.json"
rm -f "$VERSIONS_FILE"
STARTED=$SECONDS
FAILED=0
TIMEOUT=()
if command -v timeout >/dev/null; then
  # --foreground keeps the phase in this shell's process group, so Ctrl-C reaches torchrun's ranks;
  # at the limit torchrun gets SIGTERM (and stops its ranks), and SIGKILL a minute later.
  TIMEOUT=(timeout --foreground -k 60 "$PHASE_TIMEOUT")
fi

# --- the summary --------------------------------------------------------------------------------

record() {  # record NAME STATUS SECONDS REASON [RESULT]
  local reason="${4//$SEP/ }"
  reason="${reason//$'\n'/ }"
  printf "%s$SEP%s$SEP%s$SEP%s$SEP%s\n" "$1" "$2" "$3" "$reason" "${5:-}" >> "$PHASE_FILE"
  [[ "$2" != failed && "$2" != timeout ]] || FAILED=1
}

json_string() {  # a bash string as a JSON string (the reasons are single lines)
  local s="${1//\\/\\\\}"
  s="${s//\"/\\\"}"
  printf '"%s"' "$s"
}

write_summary() {  # write_summary FINAL_LINE: OUT/gpu_check.json (with Python's help when it runs)
  local summary="$OUT/gpu_check.json"
  if "$PYTHON" - "$PHASE_FILE" "$summary" "$1" "$DEVICE" "$NPROC" "$((SECONDS - STARTED))" "$VERSIONS_FILE" \
      2>/dev/null <<'PY'
import json, sys
from pathlib import Path

phase_file, summary, final, device, nproc, seconds, versions = sys.argv[1:8]
phases = []
for line in Path(phase_file).read_text().splitlines():
    name, status, secs, reason, result = line.split("\x1f")
    phase = {"name": name, "status": status, "seconds": int(secs), "reason": reason or None,
             "result": result or None}
    try:  # the headline numbers of each result file
        data = json.loads(Path(result).read_text()) if result else None
    except (OSError, ValueError):
        data = None
    if data and name == "train":
        phase["headline"] = {f"zero{s['zero_stage']}": {k: s["throughput"][k] for k in
                             ("images_per_s", "mfu", "data_wait_fraction", "max_memory_gb")}
                             for s in data.get("stages", [])}
    elif data and name.startswith("mfu"):
        phase["headline"] = {k: data.get(k) for k in ("ours", "baseline", "unit", "ratio")}
    elif data and name == "ray":
        phase["headline"] = data.get("throughput")
    phases.append(phase)
doc = {"name": "gpu_check", "passed": all(p["status"] in ("ok", "skipped") for p in phases),
       "device": device, "nproc": int(nproc) if nproc else None, "seconds": int(seconds),
       "versions": json.loads(Path(versions).read_text()) if Path(versions).exists() else None,
       "phases": phases, "final": final}
Path(summary).write_text(json.dumps(doc, indent=2) + "\n")
PY
  then
    return 0
  fi
  # No working Python (the environment phase failed): the phases alone, written by hand.
  {
    printf '{"name": "gpu_check", "passed": false, "device": "%s", "final": %s, "phases": [' "$DEVICE" "$(json_string "$1")"
    local first=1 name status secs reason result
    while IFS="$SEP" read -r name status secs reason result; do
      [[ $first == 1 ]] || printf ', '
      first=0
      printf '{"name": "%s", "status": "%s", "seconds": %s, "reason": %s}' "$name" "$status" "$secs" "$(json_string "$reason")"
    done < "$PHASE_FILE"
    printf ']}\n'
  } > "$summary"
}

finish() {  # the final line, and the exit status
  local took=$((SECONDS - STARTED)) phases="" failures="" name status secs reason result line
  while IFS="$SEP" read -r name status secs reason result; do
    case "$status" in
      ok) phases+="${phases:+, }$name ok" ;;
      skipped) phases+="${phases:+, }$name skipped${reason:+ ($reason)}" ;;
      *) phases+="${phases:+, }$name $status"; failures+="${failures:+; }$name: $reason" ;;
    esac
  done < "$PHASE_FILE"
  if [[ $FAILED == 0 ]]; then
    line="gpu_check: PASSED in $((took / 60))m$((took % 60))s: $phases"
  else
    line="gpu_check: FAILED in $((took / 60))m$((took % 60))s: $failures"
  fi
  write_summary "$line"
  echo "$line; summary: $OUT/gpu_check.json"
  exit "$FAILED"
}

die() {  # die PHASE REASON: a phase everything else needs has failed; one line, then stop
  record "$1" failed "$((SECONDS - PHASE_START))" "$2"
  write_summary "gpu_check: error: $2"
  echo "gpu_check: error: $2" >&2
  exit 1
}

reason_from_log() {  # reason_from_log LOG RC: the one line that says why a phase failed
  local found
  found="$(grep -aoE '(gpu_check|vitpipe): (FAILED|error): .*' "$1" | tail -n 1 | sed -E 's/^[a-z_]+: (FAILED|error): //')" || true
  if [[ -z "$found" ]]; then
    found="$(grep -aE '^[A-Za-z_.]*(Error|Exception)(: .*)?$' "$1" | tail -n 1)" || true
  fi
  if [[ $2 == 124 || $2 == 137 ]]; then
    found="timed out after ${PHASE_TIMEOUT} s${found:+ ($found)}"
  fi
  echo "${found:-exit status $2; see $1}" | cut -c1-400
}

run_phase() {  # run_phase NAME RESULT_FILE COMMAND...: the command's output goes to the terminal and the log
  local name="$1" result="$2" log="$LOGS/$1.log" start=$SECONDS rc
  shift 2
  echo "== gpu_check: $name: $*" >&2
  set +e
  "${TIMEOUT[@]}" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  if [[ $rc == 0 ]]; then
    record "$name" ok "$((SECONDS - start))" "" "$result"
  else
    record "$name" "$([[ $rc == 124 || $rc == 137 ]] && echo timeout || echo failed)" "$((SECONDS - start))" \
      "$(reason_from_log "$log" "$rc")" "$result"
  fi
  return 0
}

# --- 1. environment -------------------------------------------------------------------------------

PHASE_START=$SECONDS
command -v "$PYTHON" >/dev/null || die environment "$PYTHON not found (pass --python)"
# One interpreter start (torch takes seconds to import): its version, the GPUs it can use, their names.
read -r torch_version gpus names < <("$PYTHON" -c 'import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
print(torch.__version__, n, ", ".join(sorted({torch.cuda.get_device_name(i) for i in range(n)})))' 2>/dev/null || true)
[[ -n "${torch_version:-}" ]] \
  || die environment "$PYTHON cannot import torch: this check needs PyTorch installed (pass --python)"
if [[ "$DEVICE" == cuda ]]; then
  [[ "$gpus" -gt 0 ]] || die environment "torch.cuda.is_available() is False for $PYTHON (torch $torch_version): \
this check needs an NVIDIA GPU and CUDA PyTorch (--device cpu runs a CPU smoke run instead)"
  NPROC="${NPROC:-$gpus}"
  echo "gpu_check: $PYTHON, torch $torch_version, $gpus GPU(s): $names" >&2
else
  NPROC="${NPROC:-2}"
  echo "gpu_check: $PYTHON, torch $torch_version, CPU smoke run with $NPROC rank(s)" >&2
fi
record environment ok "$((SECONDS - PHASE_START))" ""

# --- 2. wheels -------------------------------------------------------------------------------------

PHASE_START=$SECONDS
SITE="$WORK/site"
if [[ -z "$WHEELS" ]]; then
  record wheels skipped 0 "no --wheels"
else
  # Only the wheels whose project is missing or older here: installing an older numpy or pillow
  # over the system's would shadow it (PYTHONPATH comes before site-packages) and could break torch.
  plan="$("$PYTHON" - "$WHEELS" <<'PY'
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

try:
    from packaging.version import InvalidVersion, Version
except ImportError:  # pip always carries it
    from pip._vendor.packaging.version import InvalidVersion, Version

wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
if not wheels:
    sys.exit(f"no .whl files in {sys.argv[1]}")
names = Counter(w.name.split("-")[0].lower().replace("_", "-") for w in wheels)
twice = sorted(n for n, c in names.items() if c > 1)
if twice:
    sys.exit(f"more than one wheel of {', '.join(twice)} in {sys.argv[1]}: keep one of each")
# The system's torch stack is never replaced: a torch wheel here would shadow the CUDA build.
PROTECTED = ("torch", "torchvision", "torchaudio", "triton", "nvidia-")
for wheel in wheels:
    name, version = wheel.name.split("-")[:2]
    if name.lower().replace("_", "-").startswith(PROTECTED):
        print(f"skip\t{wheel}\t{name} {version}: the system's own torch stack is never replaced")
        continue
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have is not None:
        try:
            enough = Version(have) >= Version(version)
        except InvalidVersion:
            enough = have == version
        if enough:
            print(f"skip\t{wheel}\t{name} {have} is installed (wheel {version})")
            continue
    print(f"install\t{wheel}\t{name} {version}" + (f" over {have}" if have else ""))
PY
)" || die wheels "cannot read the wheels in $WHEELS: $(tail -n 1 <<<"${plan:-?}")"
  to_install=()
  while IFS=$'\t' read -r action wheel note; do
    echo "gpu_check: wheels: $action $note" >&2
    [[ "$action" != install ]] || to_install+=("$wheel")
  done <<<"$plan"
  rm -rf "$SITE"
  if [[ ${#to_install[@]} -gt 0 ]]; then
    pip_log="$LOGS/wheels.log"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
      --target "$SITE" "${to_install[@]}" > "$pip_log" 2>&1 \
      || die wheels "pip could not install the wheels: $(grep -aE 'ERROR|rror' "$pip_log" | head -n 1 | cut -c1-300)"
  fi
  record wheels ok "$((SECONDS - PHASE_START))" "installed ${#to_install[@]} of $(wc -l <<<"$plan") wheel(s)"
fi
export PYTHONPATH="$REPO${WHEELS:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
[[ -z "$WHEELS" ]] || export PATH="$SITE/bin:$PATH"  # ninja's executable, should DeepSpeed build an op

# --- 3. imports ------------------------------------------------------------------------------------

PHASE_START=$SECONDS
MISSING_FILE="$WORK/missing.txt"
rm -f "$MISSING_FILE"
# The verdict goes to a file: DeepSpeed logs to stdout when it is imported.
"$PYTHON" - "$VERSIONS_FILE" "$MISSING_FILE" > "$LOGS/imports.log" 2>&1 <<'PY' || true
import importlib, json, sys
from importlib import metadata

# module -> the wheels it needs (beyond torch): what the trainer and DeepSpeed import.
NEEDED = {
    "numpy": "numpy", "PIL": "pillow", "yaml": "pyyaml", "tqdm": "tqdm", "safetensors": "safetensors",
    "pydantic": "pydantic pydantic-core annotated-types typing-inspection typing-extensions",
    "deepspeed": "deepspeed hjson msgpack ninja psutil py-cpuinfo einops packaging",
}
missing = []
for module, wheels in NEEDED.items():
    try:
        importlib.import_module(module)
    except Exception as err:  # an ImportError, or a version clash surfacing at import
        missing.append(f"{module} ({type(err).__name__}: {err}; wheels: {wheels})")
versions = {}
for dist in ("torch", "deepspeed", "pydantic", "numpy", "pillow", "timm", "ray", "webdataset"):
    try:
        versions[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
        versions[dist] = None
with open(sys.argv[1], "w") as f:
    json.dump(versions, f)
with open(sys.argv[2], "w") as f:
    f.write("; ".join(missing))
PY
if [[ -f "$MISSING_FILE" ]]; then
  missing="$(cat "$MISSING_FILE")"
else
  missing="the import check itself failed: $(tail -n 1 "$LOGS/imports.log")"
fi
[[ -z "$missing" ]] || die imports "cannot import $missing; add the wheels to --wheels DIR (README.md, \"GPU check\")"
record imports ok "$((SECONDS - PHASE_START))" ""
if [[ $ENV_ONLY == 1 ]]; then
  finish
fi

# --- 4. train: the trainer under torchrun, no Ray ------------------------------------------------------

train_args=(--device "$DEVICE" --out "$OUT" --work "$WORK")
[[ $QUICK == 0 ]] || train_args+=(--quick)
[[ -z "$STEPS" ]] || train_args+=(--steps "$STEPS")
[[ -z "$PEAK" ]] || train_args+=(--peak-tflops "$PEAK")
run_phase train "$OUT/gpu_check_train.json" \
  "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" bench/gpu_check.py \
  "${train_args[@]}" ${PASS_THROUGH[@]+"${PASS_THROUGH[@]}"}

# --- 5-6. gpu_mfu, eager and compiled -----------------------------------------------------------------

mfu_phase() {  # mfu_phase NAME RESULT [--compile]
  local name="$1" result="$2"
  shift 2
  local args=(--device "$DEVICE" --json "$result" "$@")
  [[ $QUICK == 0 ]] || args+=(--models B/16 --steps 5 --repeats 2 --warmup 2)
  [[ -z "$PEAK" ]] || args+=(--peak-tflops "$PEAK")
  rm -f "$result"
  run_phase "$name" "$result" "$PYTHON" bench/gpu_mfu.py "${args[@]}"
  # gpu_mfu writes its result to --json: exiting 0 without one is a failure too.
  if [[ ! -s "$result" && "$(tail -n 1 "$PHASE_FILE" | cut -d "$SEP" -f 2)" == ok ]]; then
    sed -i '$d' "$PHASE_FILE"  # replaces the phase's "ok"
    record "$name" failed 0 "bench/gpu_mfu.py wrote no result to $result"
  fi
}
if [[ $SKIP_MFU == 1 ]]; then
  record mfu skipped 0 "--skip-mfu"
  record mfu_compiled skipped 0 "--skip-mfu"
else
  mfu_phase mfu "$OUT/gpu_mfu_eager.json"
  if [[ $SKIP_COMPILE == 1 ]]; then
    record mfu_compiled skipped 0 "--skip-compile"
  else
    mfu_phase mfu_compiled "$OUT/gpu_mfu_compiled.json" --compile
  fi
fi

# --- 7. ray: the pretrain stage through Ray Train, when Ray is there -------------------------------------

if [[ $SKIP_RAY == 1 ]]; then
  record ray skipped 0 "--skip-ray"
elif ! "$PYTHON" -c 'import ray' >/dev/null 2>&1; then
  record ray skipped 0 "ray is not importable"
else
  ray_args=(--phase ray --device "$DEVICE" --out "$OUT" --work "$WORK")
  [[ $QUICK == 0 ]] || ray_args+=(--quick)
  rm -f "$OUT/gpu_check_ray.json"
  run_phase ray "$OUT/gpu_check_ray.json" "$PYTHON" bench/gpu_check.py "${ray_args[@]}"
fi

finish
