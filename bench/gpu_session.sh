#!/usr/bin/env bash
# One device visit's work, in parts that each fit a 10-minute device call.
# Stage MLX first (../shared/device/README.md; `bash bench/device_stage.sh` stages it and splits the wheel so
# that each call's carry fits beside the tracked tree: 64 MiB a call in all): call 1 carries .device/a, then
#   call 2: carry [".device/b"], command: bash bench/gpu_session.sh imports   (the machine stays warm
#           30 s between calls: issue the next at once; a fresh one needs calls 1-2 again)
#   then e.g.: check (parity, ~5 min), NEW=128,512 bash ... e2e, NEW=2048 bash ... e2e, Q=4 bash ... e2e,
#   steps (per-kernel ablation, ~30 s), cold, presets, presets-bf16, ablate31, long, warm; on
#   nvidia-h200-x2: nccl (BITS= for the tests alone, ~2.5 min).
# Next visit (session 47): issue 14. One GPU is enough (nvidia-h200). Session 46 (~28 device minutes, two stagings):
# full parity found pass 1 not building at D 32 (fixed in ceda506; the attention / compiled subset passed after);
# E2B 4-bit end to end 2.81x on a noisy stock (its warm runs 81.5 / 120.3 tok/s, ours 283); the down launch with
# the gate's L2 prefetch 31.1 us (no gain); a grid barrier ~3.5 us a stage against ~10 us a launch. In order:
#   1. `check` (full parity at HEAD: session 46 reran only the attention / compiled subset after its fix).
#   2. `Q=4 KREGEX=gemma4_attention_partial KSKIP=15 KCOUNT=8 kdetail`: the KV-shared layers' attention with the q
#      prologue (28-35 us against the writing layers' 14-16; session 46's 35-launch run reached only the first 15).
#   3. `Q=4 NEW=128 RUNS=3 e2e` and `NEW=128 RUNS=3 e2e` (bf16): stock's speed spread 81-128 tok/s in session 46.
# Timings seen on the H200: check ~7.5 min (8 processes, session 31), kernels ~5.5 min, presets ~5 min; a
# visit has 30 device minutes, so pick the parts that matter.
# PART_S (default 520) bounds each end-to-end part below the device call's limit: a call killed at
# its limit brings nothing back (the packing below runs at exit), so give the call ~60 s more.
# An e2e run of E2B takes ~75 s per side's first (cold) command, 25-45 s per later one, plus
# ~2.5 min to write the checkpoint on a fresh machine.
# Results go to $OUT (they come back with the call; only a few files per call do, so each part
# ends by packing its results into one $OUT/<part>.tgz). Timings from one call compare only with
# each other: quote ratios from the same run.
set -uo pipefail
source .device/b/setup.sh >/dev/null || exit 1
FINAL=${OUT:-out}
OUT=$(mktemp -d)
pack() {  # one archive a part; a part run twice in one call gets <part>-2.tgz, ... (session 17 lost a run that way)
  local name="$FINAL/${PART:-session}.tgz" n=2
  while [ -e "$name" ]; do name="$FINAL/${PART:-session}-$n.tgz"; n=$((n + 1)); done
  tar czf "$name" -C "$OUT" . 2>/dev/null
}
trap pack EXIT
PART=${1:-}
mkdir -p "$FINAL"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null
compare() {  # compare <out subdir> <timeout s> <args...>
  local dir="$OUT/$1" limit=$2; shift 2
  mkdir -p "$dir"
  # -X faulthandler: a native crash (seen once: SIGFPE at 32k tokens) still prints the Python stack
  timeout "$limit" python3 -X faulthandler -m bench.compare "$@" --out "$dir" > "$dir/stdout.txt" 2> "$dir/stderr.txt"
  echo "== $dir (exit $?): $*"; tail -18 "$dir/stdout.txt"
}
mem() {  # mem <name> VAR=value...: one `compare` of $P with those switches (MEM_S timeout, MEM_RUNS runs, MEM_N
         # tokens), then its peak memory and speed lines (the parts `memory` and `memory-small`)
  local n=$1; shift
  (export "$@"; timeout ${MEM_S:-150} python3 -m bench.compare $P --runs ${MEM_RUNS:-1} -n ${MEM_N:-8} --out "$OUT/$n" \
    > "$OUT/$n.txt" 2>&1)
  echo "== $n $* (exit $?)"; grep -E "^peak|^prefill tok|^decode tok" "$OUT/$n.txt"
}
tiny31() {  # the tiny 31B float32 checkpoint the issue-16 parts run `generate` on (written once)
  [ -d /root/t31 ] || python3 -c "
import mlx.core as mx
from gemma4_mlx.checkpoint import write_random_checkpoint
with mx.stream(mx.cpu):
    write_random_checkpoint('tiny-31b', '/root/t31', dtype='float32', seed=3)" > /dev/null 2>&1
}
generate31() {  # ours, a fresh process on it (environment switches as VAR=value arguments)
  (export "$@"; timeout 120 python3 -m gemma4_mlx.cli --debug generate --model /root/t31 --prompt "Hello there" \
    --greedy --max-tokens 8)
}
parity() {  # parity <name> <timeout s> <pytest collection args...>: those tests on CUDA at the CPU's
            # float32 tolerances (TF32 off), in 8 processes; $OUT/<name>.N.txt each
  local name=$1 limit=$2; shift 2
  python3 -m pytest -q -p no:cacheprovider --collect-only "$@" 2>/dev/null | grep '::' > "$OUT/ids.txt"
  echo "$(wc -l < "$OUT/ids.txt") test ids"
  for i in 0 1 2 3 4 5 6 7; do
    awk -v i=$i 'NR % 8 == i' "$OUT/ids.txt" > "$OUT/ids.$i"
    # one argument per line: parametrised ids may hold spaces. A PTX cache folder a process: MLX writes its
    # cached modules in place, so a process can read another's half-written file on a cold machine (session 26
    # lost a test to "Binary format ... is not recognized" that way; docs/upstream.md §8)
    # -v: a line a test as it ends, so a process that dies or passes its bound still says which tests ran;
    # --capture=sys: what native code writes to stderr (a C++ terminate's message) reaches the log; pytest's
    # default fd capture kept it, so session 43's abort printed faulthandler's lines alone
    (mapfile -t ids < "$OUT/ids.$i"; MLX_PTX_CACHE_DIR=/root/ptx.$i MLX_ENABLE_TF32=0 timeout "$limit" python3 -X faulthandler \
      -m pytest -v --capture=sys -p no:cacheprovider "${ids[@]}" > "$OUT/$name.$i.txt" 2>&1) &
  done
  wait
  for i in 0 1 2 3 4 5 6 7; do tail -1 "$OUT/$name.$i.txt"; done | tee "$OUT/$name.txt"
  # the tests a dead or cut process never ended (session 43 lost 12 to one abort), again in one fresh process:
  # RERUN_S bounds it (0: none)
  python3 - "$OUT" "$name" > "$OUT/$name.unrun" <<'PY'
import re, sys
out, name = sys.argv[1:3]
unrun = []
for i in range(8):
    ended = set(re.findall(r"^(tests/\S.*?) (?:PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", open(f"{out}/{name}.{i}.txt").read(), re.M))
    unrun += [t for t in open(f"{out}/ids.{i}").read().splitlines() if t.strip() and t not in ended]
print("\n".join(unrun), end="\n" if unrun else "")
PY
  if [ -s "$OUT/$name.unrun" ] && [ "${RERUN_S:-180}" -gt 0 ]; then
    echo "$(wc -l < "$OUT/$name.unrun") tests never ended: again in one process"
    (mapfile -t ids < "$OUT/$name.unrun"; MLX_PTX_CACHE_DIR=/root/ptx.0 MLX_ENABLE_TF32=0 timeout "${RERUN_S:-180}" python3 -X faulthandler -m pytest \
      -v --capture=sys -p no:cacheprovider "${ids[@]}" > "$OUT/$name.rerun.txt" 2>&1); tail -1 "$OUT/$name.rerun.txt" | tee -a "$OUT/$name.txt"
  fi
  grep -h -A25 -E "^_____" "$OUT"/$name.*.txt | head -60
  grep -h -E "^(FAILED|ERROR)" "$OUT"/$name.*.txt | head -30
  # the part's status: 1 when a test failed. (Until session 46 the grep above gave it, inverted: a run with
  # failures returned 0 and a clean one 1, through pipefail.)
  ! grep -q -h -E "^(FAILED|ERROR)" "$OUT"/$name.*.txt
}
case "${1:-}" in
  check)    # session 3: our NVRTC builds on this machine, then the CUDA parity run at the CPU's
            # float32 tolerances (TF32 off) over the kernels, the decode step, determinism and
            # every way of changing a model
    python3 -c "from gemma4_mlx.kernels import nvrtc, cuda_build as c; print('nvrtc', nvrtc.path(), nvrtc.version(), c.target_arch(), c.enabled())"
    parity parity ${PARITY_S:-480} tests/test_kernels.py tests/test_decode.py tests/test_fusion.py tests/test_cuda_build.py \
      tests/test_determinism.py tests/test_model_changes.py tests/test_expert_blocks.py ;;
  qcheck)   # the quantized matvec (qmv and its fused forms) on CUDA at the CPU's float32 tolerances:
            # the kernel tests, the decode step and the fusions with qmv, in 8 processes
    parity qcheck 300 tests/test_kernels.py tests/test_decode.py tests/test_fusion.py -k "qmv or quantized" ;;
  e2e)      # end to end, fresh processes (the README's headline), E2B: NEW (default 128,2048) new tokens,
            # RUNS (default 1) warm runs per side after each side's first run on a fresh machine; Q=4
            # for 4-bit (converted from the bf16 checkpoint, which is written once per machine)
    timeout "${PART_S:-520}" python3 -m bench.compare --e2e --preset e2b ${Q:+-q $Q} --new-tokens "${NEW:-128,2048}" \
      --runs "${RUNS:-1}" --work /root/e2e --timeout 200 --out "$OUT/e2e" > "$OUT/e2e.txt" 2>&1
    echo "exit $?"; tail -30 "$OUT/e2e.txt" ;;
  warm)     # the warm in-process harness, E2B bf16 (second table of the README)
    compare e2b-bf16 200 --preset e2b -L 128,841,4096 --runs 3 -n 64 ;;
  long)     # 32k tokens: the token check now goes through the cache in chunks
    compare e2b-bf16-32k 250 --preset e2b -L 32768 --runs 2 -n 32 ;;
  steps)    # decode-step ablation (Q=4: 4-bit): every kernel switched off one at a time, and the
            # opt-in ones (matvec: mv / qmv, never measured since launches are seeded; ple_tail) on
    export CONFIGS="${CONFIGS:-stock,ours,ours -transposes,ours +mv,ours +mv -residual,ours +mv plain,ours +qmv,ours +qmv -residual,ours +qmv plain,ours +attn_q,ours +ple_tail,ours -attn,ours -rope,ours -ple,ours +resnorm,ours -fuse,ours mlx kernels,ours kernels off,ours no compile}"
    ROUNDS=4 STEPS=15 timeout 280 python3 bench/ablate.py e2b "${Q:-0}" 2>&1 | tail -23 | tee "$OUT/ablate-e2b-q${Q:-0}.txt" ;;
  seed)     # GEMMA4_MLX_NVRTC=seed: MLX's cuda_kernel over its cache seeded by our builds (one
            # fast build, MLX's cheap per-launch hash); then the per-launch cost against cubin size
    timeout 200 python3 bench/seed_check.py 2>&1 | tail -20 | tee "$OUT/seed_check.txt"
    timeout 100 python3 bench/launch_cost.py 2>&1 | tail -5 | tee "$OUT/launch_cost.txt"
    export CONFIGS="stock,ours,ours mlx kernels,ours seeded,ours kernels off"
    ROUNDS=4 STEPS=15 timeout 200 python3 bench/ablate.py e2b 0 2>&1 | tail -9 | tee "$OUT/ablate-seed.txt" ;;
  grow)     # decode over a long generation, both sides, fresh processes (does the step slow as it grows?)
    for run in stock ours ours stock; do
      timeout 150 python3 bench/first_token.py $run e2b 402 2048 2>&1 | tail -1 | tee -a "$OUT/grow.jsonl"
    done
    GEMMA4_MLX_NVRTC=seed timeout 150 python3 bench/first_token.py ours e2b 402 2048 2>&1 | tail -1 | tee -a "$OUT/grow.jsonl" ;;
  loadprof) # session 12: ours' load() is 0.4-0.9 s longer than stock's on the GPU (not on the CPU): each
            # side's load of the E2B bf16 checkpoint in fresh processes, alternated, under cProfile
    [ -d /root/e2e/e2b-bfloat16-seed0 ] || python3 -c "
from gemma4_mlx.checkpoint import write_random_checkpoint
write_random_checkpoint('e2b', '/root/e2e/e2b-bfloat16-seed0', dtype='bfloat16', seed=0)" > /dev/null 2>&1
    for side in stock ours stock ours; do
      timeout 120 python3 -c "
import cProfile, pstats, sys, time
side = sys.argv[1]
load = __import__('mlx_lm' if side == 'stock' else 'gemma4_mlx').load
import mlx.core as mx
prof = cProfile.Profile()
t = time.perf_counter()
prof.enable()
model, tok = load('/root/e2e/e2b-bfloat16-seed0')
mx.synchronize()
prof.disable()
print(side, 'load s', round(time.perf_counter() - t, 3))
pstats.Stats(prof).sort_stats('cumulative').print_stats(18)" $side 2>&1 | grep -v "^$" | head -40 | tee -a "$OUT/loadprof.txt" | head -3
    done ;;
  imports)  # what a command imports before load(), and who pulls PyTorch in (lean_imports did not keep it out here)
    python3 -m gemma4_mlx.cli init --preset tiny --out /root/tinyck -q --force > /dev/null 2>&1
    python3 -X importtime -c "import sys; from gemma4_mlx.cli import main; main(sys.argv[1:])" generate --model /root/tinyck \
      --prompt hi --max-tokens 2 --temp 0 2> "$OUT/importtime-ours.txt" > /dev/null
    python3 -X importtime -c "import mlx_lm.generate" 2> "$OUT/importtime-stock.txt"
    python3 -c "import transformers, sys; print('transformers', transformers.__version__)"
    for f in ours stock; do
      echo "$f: $(grep -c 'import time' "$OUT/importtime-$f.txt") modules; slowest:"
      sort -t'|' -k2 -n -r "$OUT/importtime-$f.txt" | head -8
      # importtime lists a module after everything it imported: torch's importers follow it,
      # each less indented than the last
      python3 -c "
import sys
rows = [l.rstrip('\\n').split('|') for l in open(sys.argv[1]) if l.startswith('import time:') and 'self' not in l]
names = [r[2] for r in rows]
at = next((i for i, n in enumerate(names) if n.strip() == 'torch'), None)
if at is None: print('  torch: not imported')
else:
    depth = len(names[at]) - len(names[at].lstrip()); chain = [names[at].strip()]
    for n in names[at + 1:]:
        d = len(n) - len(n.lstrip())
        if d < depth: chain.append(n.strip()); depth = d
    print('  torch imported by:', ' <- '.join(chain))" "$OUT/importtime-$f.txt"
    done
    python3 -c "
import sys; from gemma4_mlx.lean_imports import keep_torch_out
print('torch before:', 'torch' in sys.modules, [m for m in sys.modules if m.startswith('transformers')][:3])
print('kept out:', keep_torch_out(), 'torch after:', 'torch' in sys.modules)" ;;
  cli)      # after `e2e`: each side's in-process stream_generate on that checkpoint (what the CLI adds)
    for run in stock ours; do
      timeout 150 python3 bench/first_token.py $run /root/e2e/e2b-bfloat16-seed0 402 2048 2>&1 | tail -1 | tee -a "$OUT/cli.jsonl"
    done ;;
  graphs)   # how MLX records the step (env read once per process, so one process each, same visit):
            # CUDA graphs of <= 100 ops and <= 1,000 MB of inputs (the H100/H200 defaults), other bounds, no graphs
            # (plain stream launches: no per-node graph building, key strings or exec update on the host).
            # Session 5 found no lever (11.00 / 14.53 / 10.59 ms, an 11 ms step); session 27's steps are ~5 ms and
            # bound by the host's recording (~8 us a launching primitive), so again, E2B (Q=4: 4-bit), ~6 min:
            # MB bound alone (bf16 reads 4.5 GB a step: a commit about every 1,000 MB besides every 100 ops)
    export CONFIGS="${CONFIGS:-stock,ours}" ROUNDS=${ROUNDS:-5} STEPS=15
    for setting in "default" "MLX_USE_CUDA_GRAPHS=0" "MLX_MAX_MB_PER_BUFFER=100000" "MLX_MAX_OPS_PER_BUFFER=50" \
        "MLX_MAX_OPS_PER_BUFFER=200 MLX_MAX_MB_PER_BUFFER=100000" "MLX_MAX_OPS_PER_BUFFER=2000 MLX_MAX_MB_PER_BUFFER=100000"; do
      echo "== $setting"
      env $([ "$setting" = default ] || echo "$setting") timeout ${GRAPH_S:-80} python3 bench/ablate.py e2b ${Q:-0} 2>&1 \
        | grep -E "^  (stock|ours) " | tee -a "$OUT/ablate-graphs.txt"
    done ;;
  kernels)  # micro-benchmarks vs the stock op sequences, then the decode-step ablations
    timeout 200 python3 bench/kernel_bench.py --iters 30 > "$OUT/kernels.txt" 2>&1; head -120 "$OUT/kernels.txt"
    STEPS=40 timeout 170 python3 bench/ablate.py e2b 0 2>&1 | tail -16 | tee "$OUT/ablate-e2b-bf16.txt"
    STEPS=40 timeout 170 python3 bench/ablate.py e2b 4 2>&1 | tail -16 | tee "$OUT/ablate-e2b-q4.txt" ;;
  e2b)      # the headline comparison at three prompt lengths, bf16 and 4-bit; transformers
    compare e2b-bf16 170 --preset e2b -L 128,841,4096 --runs 3 -n 64
    compare e2b-q4 170 --preset e2b -q 4 -L 128,841,4096 --runs 3 -n 64
    compare e2b-bf16-hf 100 --preset e2b -L 841 --runs 1 -n 16 --with-transformers ;;
  split)    # session 12: where a step's time goes (bench/ablate.py's host/GPU split: the compiled call's replay,
            # async_eval's return = the host recording kernels, the sync's wait = the GPU behind), for
            # MLX's ops only, ours, and the fused forms that were slower (residual_norm, mv): is a custom
            # kernel's launch dearer on the host than MLX's, or its GPU time longer? (~5 min)
    which nsys ncu 2>&1 | head -2; ls /usr/local/cuda/bin 2>/dev/null | tr '\n' ' ' | cut -c1-400; echo
    export CONFIGS="stock,ours,ours slice write,ours +resnorm,ours +mv,ours kernels off,ours no compile"
    ROUNDS=4 STEPS=15 timeout 240 python3 bench/ablate.py e2b 0 2>&1 | tail -19 | tee "$OUT/split-e2b-q0.txt"
    export CONFIGS="stock,ours,ours slice write,ours +resnorm,ours +resnorm -qmvres,ours kernels off"
    ROUNDS=4 STEPS=15 timeout 200 python3 bench/ablate.py e4b 4 2>&1 | tail -15 | tee "$OUT/split-e4b-q4.txt" ;;
  profile)  # session 12: each kernel's GPU time in one step (bench/step_profile.py under ncu), ours then stock;
            # PRESET (default e2b), Q=4 for 4-bit, TAG names the files (e.g. a run with GEMMA4_MLX_KERNELS_DISABLE set).
            # ncu's defaults lock the clocks at base and flush the caches before each launch (so a kernel reading
            # what the last one wrote meets DRAM); LIVE=1 keeps both as a run has them (session 32)
    for side in ${SIDES:-ours stock}; do
      f="$OUT/prof-$side${TAG:+-$TAG}${LIVE:+-live}"
      timeout ${PROF_S:-200} ncu --profile-from-start off ${LIVE:+--clock-control none --cache-control none} \
        --metrics gpu__time_duration.sum --csv --log-file "$f.csv" \
        python3 bench/step_profile.py "${PRESET:-e2b}" "${Q:-0}" $side > "$f.log" 2>&1; echo "ncu exit $?"
      grep -v "^seed " "$f.log" | tail -3
      python3 bench/step_profile.py --read "$f.csv" "$f.log" 2>&1 | tee "$f.txt" | head -30
      python3 bench/step_profile.py --read "$f.csv" "$f.log" --grid > "$f-grid.txt" 2>&1  # launches by shape
      gzip -f "$f.csv"
    done ;;
  profile32k) # session 34: E2B's decode step after a 32,768-token prompt, ours' kernels under ncu (split32k: at 32k ours'
            # GPU waits 2.3 ms after the host, 1.2 ms at 841: which kernels grow with the context?); Q=4 for 4-bit (~2 min)
    f="$OUT/prof32k-ours-q${Q:-0}${LIVE:+-live}"
    CONTEXT=${CONTEXT:-32768} timeout ${PROF_S:-240} ncu --profile-from-start off ${LIVE:+--clock-control none --cache-control none} \
      --metrics gpu__time_duration.sum --csv --log-file "$f.csv" python3 bench/step_profile.py e2b "${Q:-0}" ours > "$f.log" 2>&1
    echo "ncu exit $?"; grep -v "^seed " "$f.log" | tail -3
    python3 bench/step_profile.py --read "$f.csv" "$f.log" 2>&1 | tee "$f.txt" | head -24
    python3 bench/step_profile.py --read "$f.csv" "$f.log" --grid > "$f-grid.txt" 2>&1
    gzip -f "$f.csv" ;;
  loadphases) # session 34: each side's load() of the E2B checkpoint (Q=4: its 4-bit copy) in fresh processes, alternated,
            # ours by phase (bench/load_phases.py; session 33's e2e read ours' load() 1.22x stock's in 4-bit) (~4 min with
            # the checkpoint written)
    timeout 300 python3 -c "
from gemma4_mlx.bench.e2e import E2ESettings, prepare_checkpoint
print(prepare_checkpoint(E2ESettings(preset='e2b', quantize=${Q:-None}, work='/root/e2e').resolve())['path'])" \
      > "$OUT/loadphases-path.txt" 2>&1; ck=$(tail -1 "$OUT/loadphases-path.txt"); echo "checkpoint $ck"
    for side in stock ours stock ours "ours JIT0"; do
      (if [ "$side" = "ours JIT0" ]; then export GEMMA4_MLX_JIT_WARMUP=0; fi
       timeout 120 python3 bench/load_phases.py ${side%% *} "$ck" 2>&1 | tail -1 | tee -a "$OUT/loadphases.jsonl")
    done ;;
  ablate31) # why 31B 4-bit decode ran 0.80x stock in session 2: one switch at a time
    STEPS=30 timeout 500 python3 bench/ablate.py 31b 4 2>&1 | tail -16 | tee "$OUT/ablate-31b-q4.txt" ;;
  presets)  # the other families at 841 tokens: E4B both, 26B-A4B and 31B in 4-bit
    for p in "e4b" "e4b -q 4" "26b-a4b -q 4" "31b -q 4"; do
      compare "$(echo $p | tr -d ' -')" 200 --preset $p -L 841 --runs 3 -n 32
    done ;;
  presets-bf16)  # 26B-A4B (~52 GB) and 31B (~62 GB) in bf16
    for p in "26b-a4b" "31b"; do
      compare "${p//-/}bf16" 280 --preset $p -L 841 --runs 3 -n 32
    done ;;
  fresh)    # session 11: the scale ops and the GeGLU in kernels of ours (kernels/scalar.py, kernels.geglu):
            # their CUDA parity with the compiled step's, ours' first run over empty kernel caches (what
            # MLX still JIT-compiles, and when), then the step with and without them (Q=4: 4-bit)
    parity fresh 200 tests/test_kernels.py tests/test_decode.py -k "scale or ple_kernels or compiled_decode_matches_eager"
    MLX_PTX_CACHE_DIR=$(mktemp -d) GEMMA4_MLX_CACHE=$(mktemp -d) timeout 150 python3 bench/first_token.py \
      ours e2b 402 16 2>&1 | tail -1 | tee -a "$OUT/cold.jsonl" | cut -c1-300
    python3 -c "import json; [print(m) for l in open('$OUT/cold.jsonl') for m in json.loads(l)['modules']]"
    export CONFIGS="stock,ours,ours -scale,ours slice write"
    ROUNDS=4 STEPS=15 timeout 150 python3 bench/ablate.py e2b "${Q:-0}" 2>&1 | tail -13 | tee "$OUT/ablate-scale.txt" ;;
  attn)     # session 13: attention pass 1 in tiles of 32 keys (attention_partial.inc, unrun on a GPU when
            # written): its CUDA parity (every attention test, the decode step, determinism), ~2 min
    parity attn 300 tests/test_kernels.py tests/test_decode.py tests/test_determinism.py -k "attention or decode or determin"
    MLX_ENABLE_TF32=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_jit_warmup.py 2>&1 | tail -3 ;;
  prefillhost)  # session 14: the prefill's GPU time per chunk is stock's (21.0 against 21.6 ms) but its wall time
            # 1.24-1.34x: the graph build (Python) against the evaluation per chunk, each side, and a cProfile (~2 min)
    ROUNDS=5 timeout 200 python3 bench/prefill_host.py e2b 4096 2>&1 | tee "$OUT/prefillhost-4096.txt" | head -70
    ROUNDS=2 timeout 200 python3 bench/prefill_host.py e2b 32768 2>&1 | tee "$OUT/prefillhost-32k.txt" | head -4 ;;
  eager)    # session 14: the host cost of one eager call of each op the prefill runs, ours' kernel path against
            # MLX's form (bench/eager_calls.py, ~20 s)
    timeout 120 python3 bench/eager_calls.py 2048 2>&1 | tee "$OUT/eager-2048.txt" | head -60 ;;
  launch)   # session 14: host cost per launch: a cuda_kernel with a short and with a 10 KB source (MLX hashes
            # the source at every launch), MLX's own add; since session 15 also 8 inputs, shape/stride
            # parameters, 2 outputs (what our kernels' signatures add; bench/launch_cost.py, ~40 s)
    timeout 100 python3 bench/launch_cost.py 2>&1 | tail -9 | tee "$OUT/launch_cost.txt" ;;
  defaults) # session 16: residual_norm on (the default since session 15) against off, 6 rounds a line
    for pq in "e2b 0" "e2b 4" "e4b 4" "31b 4"; do
      # the step graphs too (STEP_DOT: where the ~250 views of ours' E2B step come from; each costs host time)
      STEP_DOT="$OUT/dots-${pq// /-q}" CONFIGS="stock,ours,ours -resnorm" ROUNDS=6 STEPS=15 timeout 110 \
        python3 bench/ablate.py $pq 2>&1 | tail -8 \
        | tee "$OUT/defaults-${pq// /-q}.txt" | head -4
    done ;;
  mvdetail) # session 16: the fused matvec forms on the GPU (session 16's ncu: the joined gate/up with its residual
            # prologue 45 us a launch, q/k/v with it 33, the one-wave PLE gate with it 14.5, the plain products 4-6;
            # 7-way shared-load bank conflicts, padded away in 096c25f): Nsight Compute's full set for the first
            # 8 mv launches of one E2B bf16 step with every fused form on, then the per-instruction stall samples
            # (source page, SASS) of the one-wave PLE-gate form (~3 min). MLX names our seeded kernels
            # gemma4_seed_<hash>: a run without ncu lists the mv ones first (session 16's regex on gemma4_mv matched none).
    export GEMMA4_MLX_KERNELS_DISABLE=ple_tail,attention_prefix_q
    timeout 100 python3 bench/step_profile.py e2b 0 ours > "$OUT/mvnames.log" 2>&1
    names=$(awk '$1 == "seed" && $3 ~ /gemma4_mv_/ {print $2}' "$OUT/mvnames.log" | paste -sd'|')
    # the one-wave PLE gate (EPI 2, PRO 2), q/k/v (EPI 0, PRO 1) and gate/up (EPI 1, PRO 1) prologue forms at E2B's width: the
    # seed list also holds the self-checks' HD=128 builds, which this step never launches (session 17's
    # regex picked one of those and profiled nothing)
    gate=$(awk '$1 == "seed" && $3 ~ /gemma4_mv_bfloat16_t_.*_(2_2|0_1|1_1)_1536_[0-9]+$/ {print $2}' "$OUT/mvnames.log" | paste -sd'|')
    echo "mv kernels: ${names:-none found}; prologue forms for the source page: ${gate:-none}"
    timeout ${PROF_S:-150} ncu --profile-from-start off --set full -k "regex:($names)" --launch-count 8 --page details \
      --print-units base python3 bench/step_profile.py e2b 0 ours > "$OUT/mvdetail.txt" 2>&1; echo "ncu exit $?"
    grep -E "gemma4_seed_[0-9a-f]+ \(|^ +Duration|Achieved Occupancy|Registers Per|bank conflict|One or More Eligible" \
      "$OUT/mvdetail.txt" | head -60
    [ -n "$gate" ] && timeout ${PROF_S:-150} ncu --profile-from-start off --set full --import-source no -k "regex:($gate)" \
      --launch-count 3 --page source --print-source sass --csv python3 bench/step_profile.py e2b 0 ours \
      > "$OUT/mvsource.csv" 2>&1; echo "ncu source exit $?"; head -c 3000 "$OUT/mvsource.csv"
    gzip -f "$OUT/mvsource.csv" "$OUT/mvdetail.txt"
    unset GEMMA4_MLX_KERNELS_DISABLE ;;
  barrier)  # session 44: a grid barrier inside one launch against a launch of its own (bench/grid_barrier_probe.py:
            # 32 stages; one block an SM and two, the barrier alone and with 6 MB read a stage; ~1-2 min): what a
            # layer-in-one-launch step could spare
    for run in "132 0" "264 0" "132 6" "264 6"; do
      set -- $run
      timeout 120 python3 bench/grid_barrier_probe.py 32 $1 50 $2 2>&1 | tail -1 | tee -a "$OUT/barrier.jsonl"
    done ;;
  ttft)     # session 25: ours' first token after load() came 0.85 s against stock's 0.64 (E2B bf16, 402 tokens,
            # session 25's e2e; level in session 23): fresh processes, 16 tokens, alternated: stock, ours, ours
            # without the closing matvecs; then one of ours under cProfile up to its first token (~2 min)
    for r in 1 2; do
      for run in stock ours "ours -close"; do
        (if [ "$run" = "ours -close" ]; then
           export GEMMA4_MLX_KERNELS_DISABLE=mv_residual,ple_tail,attention_prefix_q,qmv_residual,attention_fused,mv_close,qmv_close
         fi
         timeout 120 python3 bench/first_token.py ${run%% *} e2b 402 16 ${Q:-0} 2>&1 | tail -1 | \
           python3 -c "import json,sys; d=json.loads(sys.stdin.read()); d['run']='$run'; print(json.dumps(d))" \
           | tee -a "$OUT/ttft.jsonl" | cut -c1-300)
      done
    done
    FIRST_TOKEN_PROFILE="$OUT/ttft-profile.txt" timeout 120 python3 bench/first_token.py ours e2b 402 16 ${Q:-0} \
      2>&1 | tail -1 | cut -c1-300
    head -60 "$OUT/ttft-profile.txt" ;;
  scalars)  # session 25: do our kernels pay for reading scalars MLX keeps in managed memory (arrays of <= 8 bytes,
            # host-made arrays)? bench/scalar_probe.py: a volatile read chain per place, then small launches under
            # ncu, their GPU time per place (~1 min)
    timeout 120 python3 bench/scalar_probe.py chain 2>&1 | tee "$OUT/scalars-chain.txt"
    timeout 150 ncu --metrics gpu__time_duration.sum --csv --log-file "$OUT/scalars.csv" \
      python3 bench/scalar_probe.py launches > "$OUT/scalars-launches.txt" 2>&1; echo "ncu exit $?"
    cat "$OUT/scalars-launches.txt"
    python3 - "$OUT/scalars.csv" <<'PY' | tee "$OUT/scalars.txt"
import collections, csv, statistics, sys
rows = list(csv.reader(l for l in open(sys.argv[1]) if l.startswith('"')))
if not rows:
    sys.exit("nothing profiled")
head = rows[0]
name, unit, value = head.index("Kernel Name"), head.index("Metric Unit"), head.index("Metric Value")
us = collections.defaultdict(list)
for r in rows[1:]:
    v = float(r[value].replace(",", ""))
    us[r[name][:40]].append(v / 1000 if r[unit].startswith("n") else v * (1000 if r[unit].startswith("m") else 1))
for k, v in sorted(us.items()):
    print(f"{k:40s} n={len(v):3d} median {statistics.median(v):7.2f} us  max {max(v):7.2f}")
PY
    gzip -f "$OUT/scalars.csv" ;;
  constants)  # session 25: GEMMA4_MLX_DEVICE_CONSTANTS (the kernels' eps / scales / launch parameters and the
            # step's per-token integers in device memory; on by default on CUDA since session 26): the decode parity
            # tests (the compiled-against-eager ones included), then the step with and without it, E2B bf16 /
            # 4-bit and 26B-A4B 4-bit (~5 min)
    parity constcheck 300 tests/test_decode.py tests/test_kernels.py \
      -k "compiled or closing or matvec_close or moe or device_constants"
    for pq in "e2b 0" "e2b 4" "26b-a4b 4"; do
      # the step graphs too (STEP_DOT): where 26B-A4B's 181 Reshapes a step come from, read here offline
      STEP_DOT="$OUT/dots-${pq// /-q}" CONFIGS="stock,ours,ours -device constants" ROUNDS=${ROUNDS:-7} STEPS=15 timeout ${CONST_S:-170} \
        python3 bench/ablate.py $pq 2>&1 | tail -9 | tee "$OUT/constants-${pq// /-q}.txt"
    done ;;
  capture)  # session 26: a fresh `gemma4-mlx generate` of E2B bf16 died in its first run with "cudaStreamEndCapture
            # failed: operation failed due to a previous error during capture" (device constants on, kernel checks on a
            # thread at load): fresh processes, each with empty caches, under each switch (~5 min with the checkpoint)
    [ -d /root/e2e/e2b-bfloat16-seed0 ] || python3 -c "
from gemma4_mlx.checkpoint import write_random_checkpoint
write_random_checkpoint('e2b', '/root/e2e/e2b-bfloat16-seed0', dtype='bfloat16', seed=0)" > /dev/null 2>&1
    prompt=$(python3 -c "print(' '.join(f'word{i % 97} and' for i in range(200)))")
    n=0
    for combo in "" "GEMMA4_MLX_DEVICE_CONSTANTS=0" "GEMMA4_MLX_CHECK_AHEAD=0" "" "GEMMA4_MLX_CHECK_AHEAD=0 GEMMA4_MLX_JIT_WARMUP=0" \
                 "GEMMA4_MLX_DEVICE_CONSTANTS=0"; do
      n=$((n + 1))
      (export MLX_PTX_CACHE_DIR=/root/cap/$n/ptx GEMMA4_MLX_CACHE=/root/cap/$n/ours $combo
       # the module, not the console script: the staged wheel's setup does not put `gemma4-mlx` on PATH (rc 127)
       timeout ${CAP_S:-60} python3 -m gemma4_mlx.cli generate --model /root/e2e/e2b-bfloat16-seed0 --prompt "$prompt" --max-tokens 64 \
         --temp 0 --no-chat-template > "$OUT/capture.$n.txt" 2>&1; echo "rc $?" >> "$OUT/capture.$n.txt")
      echo "== $n [${combo:-default}] $(tail -1 "$OUT/capture.$n.txt") $(grep -m1 -o "what().*" "$OUT/capture.$n.txt")"
    done ;;
  qkvnorm)  # session 28: qkv_norm_rope (off by default): a cache-writing layer's q norm + RoPE and k / v norms in one
            # launch instead of two: its parity on CUDA, then the step with it (and with attention_prefix_q too, which
            # takes the KV-shared layers' q norm into their attention), E2B bf16 / 4-bit, E4B bf16, 26B-A4B 4-bit (~6 min)
    parity qkvcheck ${QKV_PARITY_S:-200} tests/test_decode.py tests/test_kernels.py tests/test_cuda_build.py \
      -k "norm_rope or one_norm_launch or q_norm"
    for pq in "e2b 0" "e2b 4" "e4b 0" "26b-a4b 4"; do
      CONFIGS="${CONFIGS:-stock,ours,ours +qkv norm,ours +qkv norm +attn_q}" ROUNDS=${ROUNDS:-7} STEPS=15 \
        timeout ${QKV_S:-110} python3 bench/ablate.py $pq 2>&1 | tail -16 | tee "$OUT/qkvnorm-${pq// /-q}.txt"
    done ;;
  tests)    # session 30: a chosen set of tests on CUDA as `check` runs them: TESTS (files, default the check's
            # kernel / decode files), K (a -k expression, default every test), TESTS_S (default 300)
    parity tests ${TESTS_S:-300} ${TESTS:-tests/test_kernels.py tests/test_decode.py tests/test_cuda_build.py} \
      ${K:+-k "$K"} ;;
  ablate)   # session 30: the step ablation of CONFIGS (default stock,ours) for each "family bits" in FAMILIES
            # (default "e2b 0"), ROUNDS (default 5) rounds of 15 steps, ABLATE_S (default 110) seconds each
    IFS=';' read -ra fams <<< "${FAMILIES:-e2b 0}"
    for pq in "${fams[@]}"; do
      CONFIGS="${CONFIGS:-stock,ours}" ROUNDS=${ROUNDS:-5} STEPS=15 timeout ${ABLATE_S:-110} python3 bench/ablate.py $pq \
        2>&1 | tail -16 | tee "$OUT/ablate-${pq// /-q}.txt"
    done ;;
  pleq)     # session 29: ple_combine_q (off by default): a quantized model's PLE table read packed in the combine's
            # launch instead of MLX's gathers + dequantize + scales: its parity on CUDA, then E2B / E4B 4-bit steps (~4 min)
    parity pleqcheck ${PLEQ_PARITY_S:-150} tests/test_kernels.py tests/test_cuda_build.py -k "ple_combine"
    for pq in "e2b 4" "e4b 4"; do
      CONFIGS="${CONFIGS:-stock,ours,ours +ple q}" ROUNDS=${ROUNDS:-7} STEPS=15 \
        timeout ${PLEQ_S:-110} python3 bench/ablate.py $pq 2>&1 | tail -16 | tee "$OUT/pleq-${pq// /-q}.txt"
    done ;;
  ints)     # session 31: the step's integers taken from the last step's output (step_ints, off by default since 32) against
            # copied from the host at every token (a launch reading a managed page the host just wrote: 238 us of
            # 31B bf16's step under ncu): the decode parity tests with it, E2B's profile (is that launch gone?), then
            # the step with and without it, E2B bf16 / 4-bit and 26B-A4B 4-bit (~6 min)
    parity intscheck ${INTS_PARITY_S:-200} tests/test_decode.py tests/test_determinism.py -k "compiled or device or step"
    f="$OUT/prof-ours-e2b"  # the step's first launches: no copy reading the host's page left
    timeout 150 ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file "$f.csv" \
      python3 bench/step_profile.py e2b 0 ours > "$f.log" 2>&1; echo "ncu exit $?"
    python3 bench/step_profile.py --read "$f.csv" "$f.log" 2>&1 | tee "$f.txt" | head -14; gzip -f "$f.csv"
    for pq in "e2b 0" "e2b 4" "26b-a4b 4"; do
      CONFIGS="${CONFIGS:-stock,ours,ours +ints ahead}" ROUNDS=${ROUNDS:-7} STEPS=15 \
        timeout ${INTS_S:-170} python3 bench/ablate.py $pq 2>&1 | tail -12 | tee "$OUT/ints-${pq// /-q}.txt"
    done ;;
  attnsweep) # session 32: the decode attention's geometry (splits of 16 / 64 keys against 32, a group's query rows
            # in tiles of 4 / 2 against 8): E2B's sliding layers run on 16 threadgroups @841, 19.4 us a launch
            # under ncu (19% of its 4-bit step's GPU time); E2B bf16 / 4-bit, 31B bf16 (~5 min; each line at most
            # ATTN_S=170 s: a 26B model's three lines ran past 110 s in session 32's `ints`). Session 33: no
            # geometry faster beyond the rounds' spread on E2B. bench/ablate.py builds a model a line over the
            # same weights, each with its own joined q/k/v and gate/up (~30 GB on 31B bf16): six 31B lines ran
            # out of the H200's memory (session 33), so 31B gets two
    attnline() { ROUNDS=${ROUNDS:-7} STEPS=15 timeout ${ATTN_S:-170} python3 bench/ablate.py $1 $2 2>&1 | tail -16 | \
      tee "$OUT/attnsweep-$1-q$2.txt"; }
    for q in 0 4; do
      CONFIGS="${CONFIGS:-ours,ours attn keys 16,ours attn keys 64,ours attn rows 4,ours attn rows 2,ours attn rows 4 keys 16}" \
        attnline e2b $q
    done
    CONFIGS="${CONFIGS:-ours,ours attn rows 4 keys 16}" attnline 31b 0 ;;
  pipe)     # session 36: the step timed in mlx-lm's order (PIPE=1: the next step recorded and submitted before the host
            # waits for this one, as a user's generate runs; the sync-per-step times add the GPU's tail to the host's,
            # so a change trading host time for GPU time read slower there than a user meets it): E2B 4-bit and bf16
            # with the launch-sparing forms that sync-per-step runs kept off (the q norm in the attention's launch: 20
            # launches fewer; shared slot indices: 54 views fewer), then MLX's graph size (MLX_MAX_OPS_PER_BUFFER, read
            # once a process) in that order, E2B 4-bit (~9 min)
    for pq in "e2b 4" "e2b 0"; do
      PIPE=1 CONFIGS="${CONFIGS:-stock,ours,ours +attn_q,ours +shared slots}" ROUNDS=${ROUNDS:-5} STEPS=15 \
        timeout ${PIPE_S:-170} python3 bench/ablate.py $pq 2>&1 | tail -16 | tee "$OUT/pipe-${pq// /-q}.txt"
    done ;;
  iocost)   # session 40: MLX's host cost a launch of each distinct / shared input (bench/input_cost.py, session 38's
            # lines), then of each output past the first against one packed output cut by a Split (OUTPUTS=1): whether
            # E2B's 170 outputs past its launches' first (bench/step_inputs.py) are worth packing (~1.5 min)
    timeout 100 python3 bench/input_cost.py 2>&1 | tail -7 | tee "$OUT/input_cost.txt"
    OUTPUTS=1 timeout 100 python3 bench/input_cost.py 2>&1 | tail -7 | tee "$OUT/output_cost.txt" ;;
  scratch)  # session 40: the fused attention's scratch a shared input it writes (GEMMA4_MLX_ATTN_SCRATCH, on by default on
            # CUDA since session 41): its parity on CUDA (the kernels and the compiled steps against eager; the fused
            # test also with it off), then E2B / E4B 4-bit in mlx-lm's order with and without it (~6 min; FAMILIES=""
            # for the parity alone)
    parity scratchcheck ${SCRATCH_PARITY_S:-200} tests/test_kernels.py tests/test_decode.py tests/test_determinism.py \
      -k "attention or fused or compiled or eager or determin"
    (export GEMMA4_MLX_ATTN_SCRATCH=0
     parity scratchoff ${SCRATCH_PARITY_S:-200} tests/test_decode.py -k "fused_attention_equals")
    IFS=';' read -ra fams <<< "${FAMILIES-e2b 4;e4b 4}"
    for pq in "${fams[@]}"; do
      PIPE=1 CONFIGS="${CONFIGS:-stock,ours,ours -attn scratch}" ROUNDS=${ROUNDS:-9} STEPS=15 \
        timeout ${SCRATCH_S:-150} python3 bench/ablate.py $pq 2>&1 | tail -14 | tee "$OUT/scratch-${pq// /-q}.txt"
    done ;;
  abort43)  # session 43: session 43's check aborted its process ("Fatal Python error: Aborted", no message) in
            # test_decode_with_the_closing_matvecs_equals_decode_without[dtype1-4-bit]'s run with qmv_close off, and cut
            # the 12 tests after it; one process passed its time bound on test_blocked_float_experts_equal_switch_glu.
            # That test alone with the defaults, without CLOSE_ROWS, without CLOSE_PACK, with CUDA_LAUNCH_BLOCKING; then
            # under compute-sanitizer if it aborts; then the tests the abort and the bound cut (~6 min)
    t="tests/test_decode.py::test_decode_with_the_closing_matvecs_equals_decode_without[dtype1-4-bit]"
    one() {  # one <name> VAR=value...: that test in a fresh process, its last lines
      (export "$@"; MLX_ENABLE_TF32=0 timeout ${ONE_S:-90} python3 -X faulthandler -m pytest -q -p no:cacheprovider -x "$t" \
        > "$OUT/$1.txt" 2>&1; echo "== $1 $* (exit $?)"; grep -v "^  File\|^Thread\|^$\|Extension modules" "$OUT/$1.txt" | tail -8)
    }
    one defaults
    one norows GEMMA4_MLX_CLOSE_ROWS=0
    one nopack GEMMA4_MLX_CLOSE_PACK=0
    one blocking CUDA_LAUNCH_BLOCKING=1
    if command -v compute-sanitizer > /dev/null && ! grep -q " passed" "$OUT/defaults.txt"; then
      MLX_ENABLE_TF32=0 timeout ${SAN_S:-150} compute-sanitizer --tool memcheck --print-limit 5 python3 -m pytest -q \
        -p no:cacheprovider -x "$t" > "$OUT/sanitizer.txt" 2>&1; echo "== sanitizer (exit $?)"
      grep -m 12 -E "Invalid|Address|at 0x|by thread|kernel|Saved host" "$OUT/sanitizer.txt"
    fi
    MLX_ENABLE_TF32=0 timeout ${REST_S:-200} python3 -m pytest -q -p no:cacheprovider --durations 5 \
      tests/test_kernels.py::test_ops_ple_tail_is_the_unfused_sequence \
      tests/test_decode.py::test_residual_norm_kernel_runs_in_decode_steps_not_over_prefill_chunks \
      tests/test_decode.py::test_a_traced_step_is_its_threads_alone \
      "tests/test_decode.py::test_the_first_step_checks_a_fallback_only_where_its_kernel_fails[passes]" \
      "tests/test_fusion.py::test_quantized_projections_fuse_only_when_formats_match" \
      "tests/test_cuda_build.py::test_cubins_come_back_from_the_disk_cache" \
      "tests/test_cuda_build.py::test_short_sources_fall_back_to_the_full_text_where_files_cannot_be_included[a file where the folder should be]" \
      "tests/test_determinism.py::test_the_same_request_gives_the_same_tokens[0-float32]" \
      "tests/test_model_changes.py::test_a_switch_changed_after_tracing_rebuilds_the_step" \
      "tests/test_model_changes.py::test_the_kernel_launch_switches_rebuild_the_step[GEMMA4_MLX_ATTN_COMBINE_TILES-1]" \
      "tests/test_model_changes.py::test_a_lora_scale_edited_in_place_after_tracing" \
      "tests/test_expert_blocks.py::test_blocked_experts_equal_switch_glu[shape2-uniform]" \
      "tests/test_expert_blocks.py::test_a_quantized_moe_prefill_through_blocks" \
      tests/test_expert_blocks.py::test_blocked_float_experts_equal_switch_glu \
      > "$OUT/rest.txt" 2>&1; echo "== rest (exit $?)"; tail -15 "$OUT/rest.txt" ;;
  closerows) # session 42: a close's new residual and next norm (or PLE gate) as lanes of one output (GEMMA4_MLX_CLOSE_ROWS,
            # gemma4_mlx/lanes.py) and its constants in one input (GEMMA4_MLX_CLOSE_PACK), both on by default on CUDA
            # since session 42: the closing forms' kernel tests and the compiled steps against eager (~1.5 min), then
            # the step without each in mlx-lm's order for FAMILIES (default E4B 4-bit and bf16, 26B-A4B 4-bit; E2B's
            # were measured in session 42) (~2 min a family)
    parity rowsdecode ${CLOSE_PARITY_S:-200} tests/test_kernels.py tests/test_decode.py tests/test_determinism.py \
      -k "close or compiled or eager or determin or lane"
    IFS=';' read -ra fams <<< "${FAMILIES-e4b 4;e4b 0;26b-a4b 4}"
    for pq in "${fams[@]}"; do
      PIPE=1 CONFIGS="${CONFIGS:-stock,ours,ours -close rows,ours -close pack -rows}" ROUNDS=${ROUNDS:-7} STEPS=15 \
        timeout ${CLOSE_S:-170} python3 bench/ablate.py $pq 2>&1 | tail -14 | tee "$OUT/closerows-${pq// /-q}.txt"
    done ;;
  closepack) # session 41: a closing launch's norm weights, layer scalar and eps in one input (GEMMA4_MLX_CLOSE_PACK=1,
            # off by default; kernels/close_params.py; 280 inputs fewer a step on E2B 4-bit): its parity on CUDA (the closing
            # forms' kernel tests, which run both ways, and the compiled steps against eager with it on), then E2B /
            # E4B 4-bit and E2B bf16 in mlx-lm's order with and without it (~7 min; FAMILIES="" for the parity alone)
    parity closecheck ${CLOSE_PARITY_S:-200} tests/test_kernels.py -k "close"
    (export GEMMA4_MLX_CLOSE_PACK=1
     parity closedecode ${CLOSE_PARITY_S:-200} tests/test_decode.py tests/test_determinism.py \
       -k "close or compiled or eager or determin")
    IFS=';' read -ra fams <<< "${FAMILIES-e2b 4;e4b 4;e2b 0}"
    for pq in "${fams[@]}"; do
      PIPE=1 CONFIGS="${CONFIGS:-stock,ours,ours +close pack}" ROUNDS=${ROUNDS:-9} STEPS=15 \
        timeout ${CLOSE_S:-150} python3 bench/ablate.py $pq 2>&1 | tail -14 | tee "$OUT/closepack-${pq// /-q}.txt"
    done ;;
  qpack)    # session 38: a 4/8-bit projection's words, scales and biases in one buffer, one kernel input where there were
            # three (kernels/qmv.py's QPACK; bench/input_cost.py: ~0.6-1.2 us of host a distinct input a launch): its
            # parity on CUDA, then E2B / E4B 4-bit in mlx-lm's order with and without it (~8 min)
    parity qpackcheck ${QPACK_PARITY_S:-200} tests/test_kernels.py tests/test_decode.py tests/test_cuda_build.py \
      -k "qmv or packed or quantiz or close"
    IFS=';' read -ra fams <<< "${FAMILIES:-e2b 4;e4b 4}"
    for pq in "${fams[@]}"; do
      PIPE=1 CONFIGS="${CONFIGS:-stock,ours,ours -qpack,ours -gate pack}" ROUNDS=${ROUNDS:-5} STEPS=15 \
        timeout ${QPACK_S:-150} python3 bench/ablate.py $pq 2>&1 | tail -18 | tee "$OUT/qpack-${pq// /-q}.txt"
    done ;;
  qkvjoined) # session 38: qkv_joined (off by default): a writing layer's norms + RoPE over its joined q/k/v product itself
            # (one input where the split views were three, no Split / Slice before it): its parity with it on, then E2B
            # 4-bit and bf16 in mlx-lm's order with and without it (~6 min)
    (export GEMMA4_MLX_KERNELS_DISABLE=-qkv_joined; parity qkvjoinedcheck ${QKVJ_PARITY_S:-150} tests/test_kernels.py \
      tests/test_decode.py tests/test_cuda_build.py -k "qkv or compiled or decode_with")
    IFS=';' read -ra fams <<< "${FAMILIES:-e2b 4;e2b 0}"
    for pq in "${fams[@]}"; do
      PIPE=1 CONFIGS="${CONFIGS:-stock,ours,ours +qkv joined}" ROUNDS=${ROUNDS:-7} STEPS=15 \
        timeout ${QKVJ_S:-150} python3 bench/ablate.py $pq 2>&1 | tail -16 | tee "$OUT/qkvjoined-${pq// /-q}.txt"
    done ;;
  pipegraphs) # session 36: MLX_MAX_OPS_PER_BUFFER 50 / 200 / 400 (default 100) with the step in mlx-lm's order, E2B 4-bit,
            # a process each (~5 min)
    for ops in ${GRAPH_OPS:-50 200 400}; do
      MLX_MAX_OPS_PER_BUFFER=$ops PIPE=1 CONFIGS="${CONFIGS:-stock,ours}" ROUNDS=${ROUNDS:-5} STEPS=15 \
        timeout ${PIPE_S:-110} python3 bench/ablate.py e2b 4 2>&1 | tail -10 | tee "$OUT/pipegraphs-$ops.txt"
    done ;;
  split32k) # session 33: E2B's step at a 32,768-token context, ours against stock, with the host / GPU split (is it
            # bound by the host there too? `long` read ours 243 tok/s @32k, 240 @8k: no slower with 32x the context,
            # stock 108); bf16 then 4-bit (~4 min: each side's prompt filled in chunks of 2,048)
    for q in 0 4; do
      CONFIGS="${CONFIGS:-stock,ours}" PROMPT=32768 ROUNDS=${ROUNDS:-5} STEPS=12 timeout ${SPLIT_S:-200} \
        python3 bench/ablate.py e2b $q 2>&1 | tail -10 | tee "$OUT/split32k-e2b-q$q.txt"
    done ;;
  attn32k)  # session 34: E2B bf16's step at a 32,768-token context with the attention's launch cap (GEMMA4_MLX_ATTN_BLOCKS
            # 132 / 264 / 1,056 against 528) and row tiles of 2: @32k its 7 global layers take 264 splits of ~125 keys in two
            # row tiles (D 512: 4 rows a tile), ~104 us a launch and a 45 us merge on 8 threadgroups (profile32k), ~1 ms of
            # a step whose GPU waits 2.3 ms after the host (~4 min: each line fills its own 32k prompt)
    CONFIGS="${CONFIGS:-ours,ours attn blocks 132,ours attn blocks 264,ours attn blocks 1056,ours attn rows 2,ours attn rows 2 blocks 264}" \
      PROMPT=32768 ROUNDS=${ROUNDS:-5} STEPS=12 timeout ${ATTN32K_S:-330} python3 bench/ablate.py e2b 0 2>&1 | tail -16 | \
      tee "$OUT/attn32k-e2b-q0.txt" ;;
  attn35)   # session 35: a long context's two passes with the split's row tiles side by side and the merge in tiles
            # of the head dim (on by default since), first their parity on CUDA (the attention tests, TF32 off), then E2B
            # bf16's step @32k against the old launches, each change alone, and the launch cap (~7 min)
    parity attncheck ${ATTN_PARITY_S:-150} tests/test_kernels.py tests/test_decode.py -k "attention"
    CONFIGS="${CONFIGS:-ours,ours attn old passes,ours attn split major,ours attn combine 1,ours attn blocks 1056}" \
      PROMPT=32768 ROUNDS=${ROUNDS:-5} STEPS=12 timeout ${ATTN32K_S:-330} python3 bench/ablate.py e2b 0 2>&1 | tail -14 | \
      tee "$OUT/attn35-e2b-q0.txt" ;;
  qmvsplit) # session 35: the 4-bit matvec with more warps in flight (session 34's ncu: latency-bound, 12-32% of the warps
            # busy): split-K over 2 / 4 warps, 4-byte loads over twice the warps. E2B 4-bit's step @32k (bound by the GPU;
            # @841 by the host), strict (a layout failing its self-check stops the line), then each kernel's GPU time at
            # 841 under ncu, default and 4-byte loads (~4 min)
    GEMMA4_MLX_KERNELS=strict CONFIGS="${CONFIGS:-ours,ours qmv split 2,ours qmv wpl 1,ours qmv wpl 1 split 4}" PROMPT=32768 \
      ROUNDS=${ROUNDS:-5} STEPS=12 timeout ${QSPLIT_S:-150} python3 bench/ablate.py e2b 4 2>&1 | tail -12 | \
      tee "$OUT/qmvsplit-e2b-q4-32k.txt"
    for tag in default wpl1; do
      f="$OUT/prof-ours-q4-$tag"
      (if [ $tag = wpl1 ]; then export GEMMA4_MLX_QMV_WPL=1; fi
       timeout ${PROF_S:-100} ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --log-file "$f.csv" \
         python3 bench/step_profile.py e2b 4 ours > "$f.log" 2>&1; echo "ncu $tag exit $?")
      python3 bench/step_profile.py --read "$f.csv" "$f.log" 2>&1 | tee "$f.txt" | head -12
      gzip -f "$f.csv"
    done ;;
  qmvrows)  # session 32: weight rows a warp group in the 4-bit matvec (GEMMA4_MLX_QMV_ROWS 1 / 4 / 8 against 2): E2B 4-bit's
            # matvecs are 72% of its step's GPU time and read at 0.3-1.1 TB/s under ncu; E2B, E4B, 31B 4-bit (~5 min;
            # each line at most QROWS_S=170 s)
    for pq in "e2b 4" "e4b 4" "31b 4"; do
      CONFIGS="${CONFIGS:-ours,ours qmv rows 1,ours qmv rows 4,ours qmv rows 8}" ROUNDS=${ROUNDS:-7} STEPS=15 \
        timeout ${QROWS_S:-170} python3 bench/ablate.py $pq 2>&1 | tail -14 | tee "$OUT/qmvrows-${pq// /-q}.txt"
    done ;;
  embed)    # session 30: embed / embed_q (on by default on CUDA since session 31): the token embedding's clamp,
            # gather(s), dequantize and scale in one launch (and ple_combine reading the step's uint32 ids unclamped):
            # its parity on CUDA, then the step without it, E2B / E4B bf16 and 4-bit (~4 min)
    parity embedcheck ${EMBED_PARITY_S:-150} tests/test_kernels.py tests/test_cuda_build.py -k "embed or ple_combine"
    for pq in "e2b 0" "e2b 4" "e4b 0" "e4b 4"; do
      CONFIGS="${CONFIGS:-stock,ours,ours -embed}" ROUNDS=${ROUNDS:-7} STEPS=15 \
        timeout ${EMBED_S:-110} python3 bench/ablate.py $pq 2>&1 | tail -12 | tee "$OUT/embed-${pq// /-q}.txt"
    done ;;
  shared)   # session 27: GEMMA4_MLX_SHARED_SLOTS=1 (off by default): the compiled-against-eager tests with it (check runs
            # them too), then the step with and without it, E2B bf16 / 4-bit and 26B-A4B 4-bit (~6 min)
    parity sharedcheck 300 tests/test_decode.py -k "compiled_decode or shared_slots"
    for pq in "e2b 0" "e2b 4" "26b-a4b 4"; do
      CONFIGS="stock,ours,ours +shared slots" ROUNDS=${ROUNDS:-7} STEPS=15 timeout ${CONST_S:-170} \
        python3 bench/ablate.py $pq 2>&1 | tail -9 | tee "$OUT/shared-${pq// /-q}.txt"
    done ;;
  steppython)  # session 27: a token's Python around the compiled step, by part, with the tree snapshot's dict
               # watchers (CPython 3.12, this machine's) and without (the scan at every step) (~1 min)
    for watch in 1 0; do
      GEMMA4_MLX_DICT_WATCH=$watch timeout 120 python3 bench/step_python.py 2>&1 | sed "s/^/watch=$watch /" \
        | tee -a "$OUT/step_python.txt"
    done ;;
  captureprobe)  # session 26: which of the load-time checks' kinds of work, on a second thread, breaks the main
                 # thread's graph capture (bench/capture_probe.py: a fresh process a case, ~7 s each). Session 27:
                 # none of the ten plain cases died (kernel and free were broken then: mended); the +main cases
                 # (the main thread loading new kernels while it captures, as a prefill does) follow them
                 # (~2.5 min for all twenty)
    timeout 400 python3 bench/capture_probe.py 2>&1 | tee "$OUT/captureprobe.txt" ;;
  kdetail)  # session 25: why E2B's slowest launches are slow (ncu sections, the step's first launches of each): attention
            # pass 1 on a sliding layer (15 us for 0.5 MB of cache), the closing down / PLE projections (16.7 / 8.9 us),
            # the joined gate/up with its GeGLU (24 us), the soft-cap (20 us for 0.5 MB), norm + RoPE (6 us) (~2 min)
            # KREGEX picks other kernels, KCOUNT how many launches after KSKIP of them (session 33: `Q=4 KREGEX=gemma4_qmv kdetail`)
    # (session 25's first try matched nothing: in the default seed mode the functions are gemma4_seed_<hash>; our own
    # builds keep the body's name, gemma4_<kernel>[_<form>], and launch the same code)
    GEMMA4_MLX_NVRTC=own timeout 240 ncu --profile-from-start off -k "regex:${KREGEX:-gemma4_(attention_partial|mv_close|mv_bare|scale|norm_rope)}" \
      -c ${KCOUNT:-24} --launch-skip ${KSKIP:-0} --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section MemoryWorkloadAnalysis --section SchedulerStats --page details --csv --log-file "$OUT/kdetail.csv" \
      python3 bench/step_profile.py "${PRESET:-e2b}" "${Q:-0}" ours > "$OUT/kdetail.log" 2>&1; echo "ncu exit $?"
    python3 - "$OUT/kdetail.csv" <<'PY' | tee "$OUT/kdetail.txt"
import csv, sys
rows = [r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
if not rows:
    sys.exit("no kernel profiled: " + open(sys.argv[1]).read()[:600])
head, seen, keep = rows[0], set(), ("Duration", "Registers Per Thread", "Achieved Occupancy", "Theoretical Occupancy",
    "Memory Throughput", "DRAM Throughput", "Grid Size", "Block Size", "Warp Cycles Per Issued Instruction",
    "Issue Slots Busy", "No Eligible", "Local", "Waves Per SM", "L2 Hit Rate", "Mem Busy", "Max Bandwidth",
    "Dynamic Shared", "Static Shared", "Active Warps Per Scheduler", "Eligible Warps")
ix = {n: head.index(n) for n in ("ID", "Kernel Name", "Metric Name", "Metric Unit", "Metric Value")}
for r in rows[1:]:
    name = f'{r[ix["Kernel Name"]][:50]} {r[head.index("Grid Size")] if "Grid Size" in head else ""}'[:70]
    if (name, r[ix["Metric Name"]]) in seen or not any(k in r[ix["Metric Name"]] for k in keep):
        continue
    seen.add((name, r[ix["Metric Name"]]))
    print(f"{r[ix['ID']]:>3} {name:70} {r[ix['Metric Name']][:40]:40} {r[ix['Metric Value']]:>12} {r[ix['Metric Unit']]}")
PY
    gzip -f "$OUT/kdetail.csv" ;;
  close)    # session 24: the o / down / PLE products with their sublayer's close in one launch (mv_close /
            # qmv_close, on by default since session 24: the launch's last block closes the row): parity on CUDA,
            # then the step with and without, E2B bf16 / 4-bit, E4B bf16 / 4-bit (~5 min)
    MLX_ENABLE_TF32=0 timeout 240 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_decode.py \
      tests/test_kernels.py -k "closing_matvecs or matvec_close" 2>&1 | tail -15
    for pq in "e2b 0" "e2b 4" "e4b 0" "e4b 4"; do
      CONFIGS="stock,ours,ours -close" ROUNDS=${ROUNDS:-7} STEPS=15 timeout ${CLOSE_S:-150} python3 bench/ablate.py $pq \
        2>&1 | tail -9 | tee "$OUT/close-${pq// /-q}.txt"
    done ;;
  attnfused)  # session 23: the decode step's attention in one launch a layer (attention_fused, off by default: pass
            # 1's last block of each group merges the splits; the emulator checks the body). Session 24: correct, no
            # faster (its merge was one block's serial loop: 35.7 us a sliding layer against 15.1 + 5.3). Session 28: a
            # warp a row merges, and the fused form takes the q norm and RoPE too (attention_prefix_q + attention_fused:
            # a layer's whole attention in one launch, 70 of E2B's 372 launching primitives fewer): its parity on CUDA,
            # then the step with each, E2B bf16 / 4-bit, E4B bf16 (~6 min)
    parity attncheck ${ATTN_PARITY_S:-200} tests/test_decode.py tests/test_cuda_build.py tests/test_kernels.py \
      -k "fused_attention or q_norm or attention"
    for pq in "e2b 0" "e2b 4" "e4b 0"; do
      CONFIGS="${CONFIGS:-stock,ours,ours +attn fused,ours +attn_q,ours +attn_q fused}" ROUNDS=${ROUNDS:-7} STEPS=15 \
        timeout ${FUSED_S:-120} python3 bench/ablate.py $pq 2>&1 | tail -16 | tee "$OUT/attnfused-${pq// /-q}.txt"
    done ;;
  fill)     # session 22: a prompt's chunks written by Model.fill_cache (gemma4_mlx/prompt_fill.py: the cache-writing
            # layers alone, the KV-shared tail and the head never built), as ours' generation and `compare` now run them:
            # the prefill alone with and without it (E2B bf16 @841 / 4,096), then `compare` E2B bf16 (FILL_S each)
    for n in 841 4096; do
      # with the tail unbuilt, the overlap's starts may no longer pay at 841 (session 17, before the fill: the last only
      # 11.9 ms against every 5th's 12.5): its settings beside the default
      CONFIGS="stock,ours,ours -fill,ours no overlap,ours overlap/5,ours overlap last" ROUNDS=${ROUNDS:-7} \
        timeout ${FILL_S:-150} python3 bench/prefill_ablate.py e2b $n 2>&1 | tail -7 | tee "$OUT/fill-e2b-$n.txt"
    done
    compare fill-e2b ${FILL_S:-150} --preset e2b -L 841,4096 --runs ${RUNS:-3} -n ${NEW:-32}
    # the same caches and tokens filled or called, bf16 on this GPU
    timeout ${FILL_S:-150} python3 bench/fill_check.py e2b 841 2>&1 | tail -4 | tee "$OUT/fill-check.txt" ;;
  blocks)   # session 21: a prompt chunk's 4-bit experts in blocks of one expert's rows (gemma4_mlx/expert_blocks.py;
            # MLX's CUDA gather_qmm takes one row a pair): the layer alone at 26B-A4B's shapes, then its tests on
            # CUDA (session 21: 150 / 90 s were not enough on a fresh machine, MLX's JIT compiling a quantized
            # matmul per tile size)
    timeout ${BLOCKS_S:-300} python3 bench/expert_blocks.py 64,256,841,2048,4096 2>&1 | tee "$OUT/expert-blocks.txt"
    # float32 parity at the CPU's tolerances: TF32 off (session 22: two tests failed with it on)
    MLX_ENABLE_TF32=0 timeout 200 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_expert_blocks.py 2>&1 \
      | tail -40 ;;
  c26)      # session 21: 26B-A4B `compare` (Q=4 default; the prefill rows go through the experts' blocks; ~6 min on a
            # fresh machine)
    compare c26 ${C26_S:-400} --preset 26b-a4b -q ${Q:-4} -L 841,4096 --runs ${RUNS:-3} -n ${NEW:-32} ;;
  moe)      # session 20: a MoE layer's small ops as two kernels (norm_pair: the router's and the experts' input
            # norms, the branches' closing norms and sum; moe_topk: the router's choice), 26B-A4B's step being
            # host-bound (session 20: 1,091 launching primitives, encode 7.1 ms of a 10.9 ms step): their parity on
            # CUDA, then the step with and without them, 4-bit and bf16 (~4 min)
    # (session 24: with the o projections' closes on by default; norm_pair_close, on by default on CUDA since
    # session 25, closes each MoE layer in its mixture's launch)
    parity moecheck 200 tests/test_kernels.py tests/test_decode.py -k "norm_pair or moe"
    for pq in "26b-a4b 4" "26b-a4b 0"; do
      CONFIGS="stock,ours,ours -close,ours -moe close,ours -moe" ROUNDS=${ROUNDS:-5} STEPS=15 timeout ${MOE_S:-300} python3 bench/ablate.py $pq 2>&1 \
        | tail -16 | tee "$OUT/moe-${pq// /-q}.txt"
    done ;;
  loop)     # session 19: the prologue forms with their blocks capped (mv.PROLOGUE_BLOCKS, 264; a block takes LOOP sets of
            # row groups in turn): their parity on CUDA (test_residual_matvec_kernel's 16,400 outputs loop), then the step
            # with +mv (E2B bf16) and +qmvres (31B 4-bit) at caps 0 (a block a set, before), 132, 264 (default), 528 (~6 min)
    parity loopcheck 200 tests/test_kernels.py tests/test_fusion.py tests/test_decode.py -k "matvec or residual or mv"
    CONFIGS="stock,ours,ours +mv,ours +mv blocks 0,ours +mv blocks 132,ours +mv blocks 528,ours +mv -residual" ROUNDS=${ROUNDS:-4} \
      STEPS=15 timeout 200 python3 bench/ablate.py e2b 0 2>&1 | tail -18 | tee "$OUT/loop-e2b-q0.txt"
    CONFIGS="stock,ours,ours +qmvres,ours +qmvres blocks 0,ours +qmvres blocks 132,ours +qmvres blocks 528" ROUNDS=${ROUNDS:-4} \
      STEPS=15 timeout 200 python3 bench/ablate.py 31b 4 2>&1 | tail -16 | tee "$OUT/loop-31b-q4.txt" ;;
  mvcheck)  # session 17: the mv kernel's parity on CUDA (its prologue forms now read the padded row in 16-byte loads)
    parity mvcheck 200 tests/test_kernels.py tests/test_fusion.py tests/test_decode.py -k "matvec or residual or mv" ;;
  memory)   # session 19: peak memory of the prefill overlap with each start waiting for the one before (ec1d15c;
            # session 18 measured it unbounded: 31B 4-bit @841 32.6 GB at every 5th layer, 27.4 none, 24.5 every
            # layer, stock 26.6; @4,096 58.1 GB every layer, 33.3 last only, stock 30.8). One run a line, 8 tokens;
            # the 31B checkpoint is written first on a fresh machine (~3 min), so give it a call of its own (~8 min)
    P="--preset 31b -q 4 -L 841,4096"
    for ov in 5 0 1; do mem "31b-ov$ov" GEMMA4_MLX_PREFILL_OVERLAP=$ov; done
    # a fresh machine writes the 26B-A4B checkpoint first (session 19: 150 s was not enough)
    P="--preset 26b-a4b -q 4 -L 841"; MEM_S=330 mem 26b-ov5 GEMMA4_MLX_PREFILL_OVERLAP=5 ;;
  memory-small) # session 19: the same for E2B bf16 and E4B 4-bit at 841 / 4,096 (speed too: the wait's cost), ~4 min
    for P in "--preset e2b -L 841,4096" "--preset e4b -q 4 -L 841,4096"; do
      for ov in ${OVS:-5 0}; do
        MEM_S=110 MEM_RUNS=2 MEM_N=16 mem "$(echo $P | cut -d' ' -f2)-ov$ov" GEMMA4_MLX_PREFILL_OVERLAP=$ov
      done
    done ;;
  signatures) # session 18: the per-form signatures (mv / qmv without the prologue: x, w [, scales, biases] [, z] -> y;
            # residual_norm without the next norm; attention pass 1 without the q norm) against the whole ones
            # (GEMMA4_MLX_FORM_SIGNATURES=0): E2B and 31B 4-bit (qmv on by default), E2B bf16 with and without +mv;
            # 6 rounds a line (~5 min)
    for pq in "e2b 4" "31b 4"; do
      CONFIGS="stock,ours,ours full signatures" ROUNDS=6 STEPS=15 timeout 110 python3 bench/ablate.py $pq 2>&1 \
        | tail -12 | tee "$OUT/signatures-${pq// /-q}.txt" | head -4
    done
    CONFIGS="stock,ours,ours full signatures,ours +mv,ours +mv full signatures" ROUNDS=6 STEPS=15 timeout 130 \
      python3 bench/ablate.py e2b 0 \
      2>&1 | tail -16 | tee "$OUT/signatures-e2b-q0.txt" | head -6 ;;
  barrier)  # session 17 (dbead71): residual_norm's and the prologue forms' loads held ahead of their barrier, the gate's
            # z ahead of the split's: their parity on CUDA, the step with and without the fused forms, and the mv
            # launches' ncu times (no source page), in one short call (~4 min)
    parity barrier 90 tests/test_kernels.py tests/test_fusion.py tests/test_decode.py -k "residual"
    CONFIGS="stock,ours,ours +mv,ours +mv -residual" ROUNDS=${ROUNDS:-4} STEPS=15 timeout 75 \
      python3 bench/ablate.py e2b 0 2>&1 | tail -11 | tee "$OUT/barrier-e2b-q0.txt"
    export GEMMA4_MLX_KERNELS_DISABLE=ple_tail,attention_prefix_q
    timeout 45 python3 bench/step_profile.py e2b 0 ours > "$OUT/mvnames.log" 2>&1
    names=$(awk '$1 == "seed" && $3 ~ /gemma4_(mv|residual_norm)_/ {print $2}' "$OUT/mvnames.log" | paste -sd'|')
    timeout 55 ncu --profile-from-start off --section SpeedOfLight --section LaunchStats -k "regex:($names)" \
      --launch-count 12 --print-units base python3 bench/step_profile.py e2b 0 ours > "$OUT/barrier-ncu.txt" 2>&1
    echo "ncu exit $?"; grep -E "gemma4_seed_[0-9a-f]+ \(|^ +Duration|Registers Per" "$OUT/barrier-ncu.txt" | head -40
    unset GEMMA4_MLX_KERNELS_DISABLE ;;
  views)    # session 17: the views each source line adds to the traced decode step on the kernel path (session 16's dots:
            # 237 views next to 547 launches in E2B's step; the CPU trace misses the kernel wrappers'), ~1 min
    timeout 150 python3 bench/step_views.py e2b 2>&1 | tee "$OUT/views-e2b.txt" | head -40 ;;
  fused)    # session 17: the fused matvec forms (mv with its GeGLU / gate / residual-prologue forms: 373 launches an E2B
            # step against the default's 547) after 096c25f's padded prologue row, E2B bf16 and 31B 4-bit (~4 min)
    CONFIGS="stock,ours,ours -geglu_joined,ours +mv,ours +mv -residual,ours +qmvres" ROUNDS=${ROUNDS:-5} STEPS=15 timeout 240 \
      python3 bench/ablate.py e2b 0 2>&1 | tail -14 | tee "$OUT/fused-e2b-q0.txt"
    CONFIGS="stock,ours,ours +qmvres,ours +qmv fused" ROUNDS=${ROUNDS:-5} STEPS=15 timeout 200 \
      python3 bench/ablate.py 31b 4 2>&1 | tail -12 | tee "$OUT/fused-31b-q4.txt" ;;
  overlap)  # session 17: the prefill overlap per prompt length (it lost at 841 and 4,096 in session 16, won at 32k),
            # and with fewer starts a chunk (GEMMA4_MLX_PREFILL_OVERLAP=N: every Nth cache-writing layer and the last);
            # more rounds for this machine's noise (~5 min)
    for n in 841 4096; do
      CONFIGS="ours,ours overlap/1,ours no overlap,ours overlap/3,ours overlap last,ours kernels off" ROUNDS=9 timeout 150 \
        python3 bench/prefill_ablate.py e2b $n 2>&1 | tail -8 | tee "$OUT/overlap-$n.txt"
    done
    CONFIGS="ours,ours no overlap,ours overlap/5,ours overlap last" ROUNDS=5 timeout 200 python3 bench/prefill_ablate.py e2b 32768 \
      2>&1 | tail -6 | tee "$OUT/overlap-32k.txt" ;;
  loads)    # session 15: residual_norm, the mv/qmv residual prologue and norm_rope now load a row before their
            # first store (each later load waited behind a store it might alias: 12.1 us a residual_norm under ncu);
            # mv can issue several steps' loads before their products (UNR): parity of those kernels, the step
            # with each fused form, the chain of E2B's bf16 products in every layout (~5 min)
    parity loads 200 tests/test_kernels.py tests/test_fusion.py tests/test_decode.py -k "residual or rope or mv or prologue"
    CONFIGS="stock,ours,ours +resnorm,ours +mv,ours +mv -residual,ours +attn_q,ours kernels off" ROUNDS=4 STEPS=15 \
      timeout 200 python3 bench/ablate.py e2b 0 2>&1 | tail -19 | tee "$OUT/loads-e2b-q0.txt"
    CONFIGS="stock,ours,ours +resnorm,ours +resnorm -qmvres" ROUNDS=4 STEPS=15 \
      timeout 150 python3 bench/ablate.py e4b 4 2>&1 | tail -12 | tee "$OUT/loads-e4b-q4.txt"
    timeout 150 python3 bench/matvec_chain.py --families E2B --bits 0 2>&1 | tee "$OUT/matvec_chain-e2b.txt" | tail -75 ;;
  short)    # session 14: short sources (MLX given include lines for each kernel's text; the default since): MLX
            # finds the seeded modules under the short names (bench/seed_check.py), then the step with and without (~2.5 min)
    timeout ${SEED_S:-80} python3 bench/seed_check.py 2>&1 | tail -12 | tee "$OUT/seed-short.txt"
    CONFIGS="stock,ours,ours full sources" ROUNDS=${ROUNDS:-4} STEPS=15 timeout ${SPLIT_S:-200} python3 bench/ablate.py e2b 0 2>&1 \
      | tail -12 | tee "$OUT/split-short.txt" ;;
  prefill)  # session 13: E2B's prefill ran 0.77-0.90x stock at 32k (`long`), 0.79-0.99x at 4,096 (`warm`): one kernel
            # off at a time, the prefill alone (bench/prefill_ablate.py), ~2 min; then `PREFILL=2048 TAG=prefill
            # bash bench/gpu_session.sh profile` for each kernel's GPU time in a 4,096-token prompt's second chunk
    # session 15's banded window (its CUDA parity first: same outputs as the dense mask, model included)
    MLX_ENABLE_TF32=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_chunk_attention.py 2>&1 | tail -3 \
      | tee "$OUT/chunk-attention-tests.txt"
    ROUNDS=3 timeout 240 python3 bench/prefill_ablate.py e2b 32768 2>&1 | tail -11 | tee "$OUT/prefill-32k.txt"
    ROUNDS=5 timeout 150 python3 bench/prefill_ablate.py e2b 4096 2>&1 | tail -11 | tee "$OUT/prefill-4096.txt" ;;
  warmup)   # session 13: MLX's JIT modules (token lookups, the cache write's scatter) built on a thread while
            # load() reads the weights (gemma4_mlx/jit_warmup.py): ours' load + first token from the E2B
            # checkpoint over empty kernel caches (a fresh machine), with the warm-up and without, alternated
    [ -d /root/e2e/e2b-bfloat16-seed0 ] || python3 -c "
from gemma4_mlx.checkpoint import write_random_checkpoint
write_random_checkpoint('e2b', '/root/e2e/e2b-bfloat16-seed0', dtype='bfloat16', seed=0)" > /dev/null 2>&1
    for w in 1 0 1 0; do
      GEMMA4_MLX_JIT_WARMUP=$w MLX_PTX_CACHE_DIR=$(mktemp -d) GEMMA4_MLX_CACHE=$(mktemp -d) timeout 150 \
        python3 bench/first_token.py ours /root/e2e/e2b-bfloat16-seed0 402 16 2>&1 | tail -1 | \
        python3 -c "import json,sys; d=json.loads(sys.stdin.read()); d['warmup']=$w; print(json.dumps(d))" | \
        tee -a "$OUT/warmup.jsonl" | cut -c1-260
    done ;;
  elementwise)  # session 11's kernels against the MLX forms they replace (bench/kernel_bench.py): the GeGLU at
            # decode and 512-token prefill shapes (the prefill's now runs ours on CUDA), the layer
            # close's (x + y) * s, the soft-cap; ~30 s
    timeout 200 python3 bench/kernel_bench.py --only geglu 2>&1 | tee "$OUT/kernels-geglu.txt" | tail -8
    timeout 200 python3 bench/kernel_bench.py --only scale 2>&1 | tee "$OUT/kernels-scale.txt" | tail -10 ;;
  cold)     # a first run on a fresh machine, in process: each side over empty kernel caches (twice, the
            # second pair after the driver's own cache is warm), listing what MLX compiled and when
    for run in stock ours stock ours; do
      MLX_PTX_CACHE_DIR=$(mktemp -d) GEMMA4_MLX_CACHE=$(mktemp -d) timeout 150 python3 bench/first_token.py \
        $run e2b 402 16 2>&1 | tail -1 | tee -a "$OUT/cold.jsonl" | cut -c1-300
    done ;;
  memloop)  # issue 16: the "cudaMemcpy ... invalid argument" of a fresh `generate` is intermittent (session 8:
            # 1 of 7 runs, under no one switch): N (default 10) fresh runs each of ours, ours with
            # CUDA_LAUNCH_BLOCKING=1, and stock mlx-lm's generate on the same checkpoint; every failure's stderr kept
    tiny31
    for side in ${SIDES:-ours blocking stock}; do
      fails=0
      for i in $(seq "${N:-10}"); do
        case $side in
          ours)     generate31 BASE=1 ;;
          blocking) generate31 CUDA_LAUNCH_BLOCKING=1 ;;
          stock)    timeout 120 python3 -m mlx_lm generate --model /root/t31 --prompt "Hello there" --max-tokens 8 --temp 0 ;;
        esac > "$OUT/loop.out" 2> "$OUT/loop.err"
        rc=$?
        if [ $rc -ne 0 ]; then fails=$((fails + 1)); cp "$OUT/loop.err" "$OUT/fail-$side-$i.err"; fi
      done
      echo "== $side: $fails of ${N:-10} runs failed" | tee -a "$OUT/memloop.txt"
    done
    for f in "$OUT"/fail-*.err; do [ -f "$f" ] && { echo "-- $f"; grep -v "^ *$" "$f" | tail -3; }; done | head -40 ;;
  membisect)  # issue 16: the memloop failure rate under one switch at a time (N runs each, JOBS at once;
              # session 7's `memcpy` part ran each switch once)
    tiny31
    one() {  # one <tag> <i> <env...>
      local tag=$1 i=$2; shift 2
      generate31 "$@" > "$OUT/b-$tag-$i.out" 2> "$OUT/b-$tag-$i.err" && rm -f "$OUT/b-$tag-$i.err"
    }
    k=0
    for env in "BASE=1" "GEMMA4_MLX_KERNELS=off" "GEMMA4_MLX_COMPILE=0" "GEMMA4_MLX_NVRTC=0" "GEMMA4_MLX_TRANSPOSES=0" \
               "GEMMA4_MLX_FUSE=0" "MLX_USE_CUDA_GRAPHS=0" "CUDA_VISIBLE_DEVICES=0" ${EXTRA_ENVS:-}; do
      k=$((k + 1))
      for i in $(seq "${N:-6}"); do
        one "$k" "$i" $env &
        [ $(jobs -r | wc -l) -ge "${JOBS:-4}" ] && wait -n
      done
      wait
      echo "== [$env] $(ls "$OUT"/b-$k-*.err 2>/dev/null | wc -l) of ${N:-6} failed" | tee -a "$OUT/membisect.txt"
    done
    for f in "$OUT"/b-*.err; do [ -f "$f" ] && { echo "-- $f"; grep -v "^ *$" "$f" | tail -2; }; done | head -30 ;;
  curdev)   # issue 16: the current CUDA device around each decode step, self-check and eval (bench/current_device.py), N runs, all at once
    tiny31
    for i in $(seq "${N:-6}"); do
      env ${CURDEV_ENV:-} timeout 120 python3 bench/current_device.py /root/t31 --prompt "Hello there" --greedy --max-tokens 8 \
        > "$OUT/cd-$i.out" 2> "$OUT/cd-$i.err" &
    done
    wait
    for i in $(seq "${N:-6}"); do
      echo "-- run $i: $(grep -c "invalid argument" "$OUT/cd-$i.err") failures"; grep "current_device\]" "$OUT/cd-$i.err" | head -${LINES_EACH:-12}
    done ;;
  chain)    # issue 14: our mv / qmv in every launch layout (rows per group x warps per group) against
            # MLX's matmul, bf16 and 4-bit, E2B / E4B / 31B shapes, per product in a compiled chain
    timeout "${CHAIN_S:-400}" python3 bench/matvec_chain.py ${FAMILIES:+--families $FAMILIES} ${BITS:+--bits $BITS} ${CHAIN_ARGS:-} 2>&1 | tee "$OUT/matvec_chain.txt" | tail -80 ;;
  quant)    # MLX's quantized_matmul / gather_qmm on this GPU against the CPU: every quantized layer
            # of the 4-bit MoE the NCCL test fails on (hidden 64, MLPs 96, group 32), then the sweep
            # over K whole and sharded (QUANT_S bounds it, default 240)
    python3 -c "
from gemma4_mlx.checkpoint import convert_checkpoint, write_random_checkpoint
from gemma4_mlx.presets import preset_config
import mlx.core as mx
cfg = preset_config('tiny-moe'); cfg.update(intermediate_size=96, moe_intermediate_size=96)
with mx.stream(mx.cpu):  # the CPU's quantizer: the checkpoint the CPU suite writes
    src = write_random_checkpoint(cfg, '/root/moe96', dtype='float32', seed=4)
    convert_checkpoint(src, '/root/moe96-4bit', quantize=True, q_bits=4, q_group_size=32)" > "$OUT/moe96.txt" 2>&1
    timeout 120 python3 bench/quant_shapes.py --checkpoint /root/moe96-4bit 2>&1 | tail -60 | tee "$OUT/quant_moe96.txt"
    timeout "${QUANT_S:-240}" python3 bench/quant_shapes.py 2>&1 | tail -60 > "$OUT/quant_shapes.txt"
    grep -c WRONG "$OUT/quant_shapes.txt"; grep -v "bfloat16" "$OUT/quant_shapes.txt" | head -20; tail -1 "$OUT/quant_shapes.txt" ;;
  nccl)     # issue 16, on nvidia-h200-x2: the sharding tests over NCCL (one GPU per process), then
            # 31B bf16 and 4-bit on 1 GPU against 2 (bench/sharded.py; RUNS default 2)
    export PATH=/root/site/bin:$PATH  # mlx.launch (the wheels are installed with --target)
    # the multi-process tests (the single-process ones are the CPU suite's; in session 5 one of them,
    # the benchmark script run after the others in the pytest process, met "cudaMemcpy ... invalid
    # argument" creating an array there: not looked into)
    GEMMA4_MLX_TEST_BACKEND=nccl MLX_ENABLE_TF32=0 timeout 240 python3 -m pytest -q -p no:cacheprovider \
      tests/test_sharding.py -k "processes or mlx_launch" > "$OUT/nccl-tests.txt" 2>&1
    tail -3 "$OUT/nccl-tests.txt"; grep -h -E "^(FAILED|ERROR)|Error" "$OUT/nccl-tests.txt" | head -10
    for bits in ${BITS-0 4}; do
      timeout 150 python3 bench/sharded.py --preset 31b --bits $bits --runs "${RUNS:-2}" \
        --out "$OUT/sharded-31b-q$bits-1.json" 2>&1 | tail -3
      timeout 150 mlx.launch --backend nccl -n 2 -- python3 bench/sharded.py --preset 31b --bits $bits \
        --runs "${RUNS:-2}" --baseline "$OUT/sharded-31b-q$bits-1.json" --out "$OUT/sharded-31b-q$bits-2.json" 2>&1 | tail -12
    done ;;
  *) echo "usage: bash bench/gpu_session.sh check|e2e|warm|long|steps|seed|grow|imports|cli|graphs|kernels|e2b|ablate31|presets|presets-bf16|cold|quant|nccl" >&2; exit 2 ;;
esac
