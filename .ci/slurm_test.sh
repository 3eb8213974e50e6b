#!/usr/bin/env bash
# Real-Slurm integration test: Debian's Slurm (slurmctld, slurmd, munge) started without systemd as a one-node
# cluster, a CI-size target of the workflow (the demo cases of tests/conftest.py -> preprocess -> layout -> split ->
# train -> the two shards of the eval sampling run, one Slurm job each) run through profiles/slurm-ci with the pinned
# executor plugin, the results checked, the job list and wall time printed, and the daemons torn down by PID.
#
#   timeout -s INT 2400 bash .ci/slurm_test.sh      # as root (apt-get); CI runs it after the pytest step
#
# SLURM_TEST_KEEP=1 keeps the work folder (/tmp/lungddpm-slurm.*); SLURM_TEST_SNAKEMAKE_TIMEOUT (seconds, default
# 1800) bounds the Snakemake run, which gets SIGINT (and cancels its Slurm jobs) when it runs over.
# The daemons use their own config, munge socket, ports (16817/16818) and state under the work folder; only
# /etc/slurm/slurm.conf must be shared (the jobstep plugin's inner srun drops SLURM_CONF), so an existing one is
# set aside and restored.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$(mktemp -d /tmp/lungddpm-slurm.XXXXXX)
ETC=$WORK/slurm
RUN=$WORK/run
CONF=$ETC/slurm.conf
SYSCONF=/etc/slurm/slurm.conf
SNAKEMAKE_TIMEOUT=${SLURM_TEST_SNAKEMAKE_TIMEOUT:-1800}
TARGETS=(results/models/demo/checkpoint.pt results/synthetic/eval/shard_0.json results/synthetic/eval/shard_1.json)
PIDS=()
NAMES=()
SYSCONF_BACKUP=""
OURS_INSTALLED=0
SMK_PID=""

log() { echo "[slurm_test $(date +%H:%M:%S)] $*"; }

teardown() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ "$rc" -ne 0 ] && [ -d "$ETC" ]; then
    for f in "$ETC"/slurmctld.log "$ETC"/slurmd.log "$ETC"/munged.log; do
      [ -f "$f" ] && { echo "---- tail $f"; tail -n 30 "$f"; }
    done
  fi
  # jobs still queued or running (an interrupted run): cancel them while slurmctld is up, so that no job process
  # outlives the daemons
  local i pid jobs
  if [ ${#PIDS[@]} -ge 2 ] && kill -0 "${PIDS[1]}" 2>/dev/null; then
    jobs=$(squeue -h -t PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
      log "cancelling Slurm jobs $jobs"
      scancel $jobs
      for _ in $(seq 1 120); do
        [ -z "$(squeue -h -t PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED -o %i 2>/dev/null)" ] && break
        sleep 0.5
      done
      squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null | grep -q . && log "ERROR: jobs still running: $(squeue -h)"
    fi
  fi
  # the daemons, by the PIDs recorded when they were started (slurmd first, munged last)
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    pid=${PIDS[$i]}
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping ${NAMES[$i]} (pid $pid)"
      kill -TERM "$pid" 2>/dev/null
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && { log "${NAMES[$i]} (pid $pid) ignored SIGTERM: SIGKILL"; kill -KILL "$pid"; }
      wait "$pid" 2>/dev/null
    fi
  done
  local alive=0
  for ((i = 0; i < ${#PIDS[@]}; i++)); do
    if kill -0 "${PIDS[$i]}" 2>/dev/null; then
      log "ERROR: ${NAMES[$i]} (pid ${PIDS[$i]}) still running"
      alive=1
    fi
  done
  [ ${#PIDS[@]} -gt 0 ] && [ "$alive" -eq 0 ] && log "daemons stopped: ${NAMES[*]} (pids ${PIDS[*]})"
  if [ "$OURS_INSTALLED" -eq 1 ]; then
    rm -f "$SYSCONF"
    [ -n "$SYSCONF_BACKUP" ] && mv "$SYSCONF_BACKUP" "$SYSCONF"
  fi
  if [ "${SLURM_TEST_KEEP:-0}" = 1 ]; then
    log "kept $WORK"
  else
    rm -rf "$WORK"
  fi
  [ "$alive" -ne 0 ] && [ "$rc" -eq 0 ] && rc=1
  log "exit $rc"
  exit "$rc"
}
interrupt() {  # SIGINT/SIGTERM (e.g. CI's timeout): one SIGINT to Snakemake, which cancels its jobs; then teardown
  log "interrupted"
  if [ -n "$SMK_PID" ] && kill -0 "$SMK_PID" 2>/dev/null; then
    kill -INT "$SMK_PID"
    wait "$SMK_PID"
  fi
  exit 130
}
trap teardown EXIT
trap interrupt INT TERM

start() {  # start NAME CMD...: run CMD in the background in its own session (no stray group signal), record its PID
  local name=$1
  shift
  setsid "$@" >"$ETC/$name.out" 2>&1 </dev/null &
  PIDS+=($!)
  NAMES+=("$name")
  sleep 0.2
  log "started $name (pid $!: $(cat "/proc/$!/comm" 2>/dev/null || echo exited))"
}

# ---------------------------------------------------------------------------------------------- 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
  || ! command -v munged >/dev/null; then
  log "installing Debian's slurmctld slurmd slurm-client munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
fi
log "$(slurmctld -V)"
log "pip install -e .[test] (its [slurm] extra pins the executor plugins; nibabel and pytest's conftest are used below)"
pip install -q -e ".[test]"
python -c "import importlib.metadata as m; print('[slurm_test] plugins:', *(n + '==' + m.version(n) for n in \
('snakemake', 'snakemake-executor-plugin-slurm', 'snakemake-executor-plugin-slurm-jobstep')))"

# ------------------------------------------------------------------------------------------------ 2. config
mkdir -p "$ETC/state" "$ETC/spool"
chmod 700 "$ETC"
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(free -m | awk '/^Mem:/ {print $2}')
NODE_MEM=$((MEM_MB * 3 / 4))
if [ "$NODE_MEM" -lt 4000 ]; then
  log "ERROR: the node needs >= 4000 MB for two 1500 MB jobs (profiles/slurm-ci); this machine has $MEM_MB MB"
  exit 1
fi
# the node line slurmd detects (sockets, cores, threads), with memory capped below the machine's
NODE_LINE=$(slurmd -C | head -n 1 | sed -E "s/RealMemory=[0-9]+/RealMemory=$NODE_MEM/")
cat >"$CONF" <<EOF
ClusterName=lungddpmci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$ETC/munge.socket
StateSaveLocation=$ETC/state
SlurmdSpoolDir=$ETC/spool
SlurmctldPidFile=$ETC/slurmctld.pid
SlurmdPidFile=$ETC/slurmd.pid
SlurmctldLogFile=$ETC/slurmctld.log
SlurmdLogFile=$ETC/slurmd.log
# no cgroups, no systemd: plain process tracking
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
# no accounting database: job states from squeue (kept visible for an hour), a job list in a text file
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$ETC/jobcomp.log
MinJobAge=3600
$NODE_LINE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=ci Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$CONF
mkdir -p /etc/slurm
if [ -e "$SYSCONF" ]; then
  SYSCONF_BACKUP=$WORK/slurm.conf.system
  mv "$SYSCONF" "$SYSCONF_BACKUP"
  log "set aside $SYSCONF (restored at the end)"
fi
cp "$CONF" "$SYSCONF"
OURS_INSTALLED=1

# ------------------------------------------------------------------------------------------------ 3. daemons
mungekey --create --keyfile="$ETC/munge.key" --force
chmod 600 "$ETC/munge.key"
start munged munged --foreground --force --key-file="$ETC/munge.key" --socket="$ETC/munge.socket" \
  --pid-file="$ETC/munged.pid" --seed-file="$ETC/munged.seed" --log-file="$ETC/munged.log"
for _ in $(seq 1 40); do [ -S "$ETC/munge.socket" ] && break; sleep 0.25; done
munge -n --socket="$ETC/munge.socket" | unmunge --socket="$ETC/munge.socket" >/dev/null
log "munge credential round trip ok"
start slurmctld slurmctld -D -c -f "$CONF"  # PIDS[1]: teardown cancels leftover jobs through it
start slurmd slurmd -D -f "$CONF"
state=""
for _ in $(seq 1 120); do
  state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1 || true)
  [ "$state" = idle ] && break
  sleep 0.5
done
if [ "$state" != idle ]; then
  log "ERROR: node state '$state' after 60 s, expected idle"
  sinfo -N -l || true
  exit 1
fi
sinfo -N -o "%N %t %c CPUs %m MB %P" | sed 's/^/[slurm_test] /'

# ----------------------------------------------------------------------------------------------- 4. workflow
python - "$RUN" <<'EOF'
import sys
from pathlib import Path

sys.path.insert(0, "tests")
from conftest import make_workdir  # the CI-size config of the test suite

make_workdir(Path(sys.argv[1]))
EOF
log "snakemake ${TARGETS[*]} (profile profiles/slurm-ci, timeout ${SNAKEMAKE_TIMEOUT}s)"
t0=$(date +%s)
# its own session, so that exactly one SIGINT reaches it: from its timeout, or forwarded by interrupt()
(cd "$RUN" && OMP_NUM_THREADS=1 exec setsid timeout --foreground -k 300 -s INT "$SNAKEMAKE_TIMEOUT" python -m snakemake \
  -s "$REPO/Snakefile" --workflow-profile "$REPO/profiles/slurm-ci" --configfile ci.yaml -- "${TARGETS[@]}" \
  >"$WORK/snakemake.log" 2>&1 </dev/null) &
SMK_PID=$!
set +e
wait "$SMK_PID"
smk_rc=$?
set -e
SMK_PID=""
wall=$(($(date +%s) - t0))
grep -E "has been submitted with SLURM jobid|Finished job|Error|error:|Exception" "$WORK/snakemake.log" \
  | sed 's/^/[snakemake] /' | tail -n 60 || true
if [ "$smk_rc" -ne 0 ]; then
  log "ERROR: snakemake exited $smk_rc after ${wall}s"
  tail -n 80 "$WORK/snakemake.log"
  find "$RUN/.snakemake/slurm_logs" -name "*.log" -exec sh -c 'echo "---- $1"; tail -n 20 "$1"' _ {} \; 2>/dev/null
  exit 1
fi

# ------------------------------------------------------------------------------------------------- 5. checks
echo "[slurm_test] Slurm job list (squeue --states=all; no accounting database): id, rule, state, time, CPUs, memory"
squeue --states=all -h -O "JobID:6,Comment:48,State:11,TimeUsed:9,NumCPUs:5,MinMemory:8,NodeList:8" | sort -n \
  | sed 's/^/    /'
echo "[slurm_test] job completion log (jobcomp/filetxt): id, state, start, end"
sed -E 's/.*JobId=([0-9]+).*JobState=([A-Z_]+).*StartTime=([^ ]+) EndTime=([^ ]+).*/\1 \2 \3 \4/' \
  "$ETC/jobcomp.log" | sort -n | sed 's/^/    /'
python - "$RUN" "$ETC/jobcomp.log" "$WORK/snakemake.log" <<'EOF'
import collections
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import yaml

from lungddpm.io import read_json

run, jobcomp, smk_log = (Path(a) for a in sys.argv[1:4])
# what Snakemake planned (its "Job stats" table) must be what Slurm ran: one Slurm job per Snakemake job
table = smk_log.read_text().split("Job stats:", 1)[1].split("total", 1)[0]
planned = collections.Counter({m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)})
out = subprocess.run(["squeue", "--states=all", "-h", "-O", "Comment:200,State:20"], check=True, capture_output=True)
rows = [line.split() for line in out.stdout.decode().splitlines()]
ran = collections.Counter(comment.removeprefix("rule_").split("_wildcards_")[0] for comment, _ in rows)
states = collections.Counter(state for _, state in rows)
n = sum(planned.values())
assert ran == planned, f"Slurm jobs per rule {dict(ran)}, Snakemake planned {dict(planned)}"
assert {"train", "sample", "preprocess"} <= set(ran) and ran["sample"] == 2, dict(ran)
assert states == {"COMPLETED": n}, f"Slurm job states {dict(states)}"
completed = [line for line in jobcomp.read_text().splitlines() if "JobState=COMPLETED" in line]
assert len(completed) == n, f"{jobcomp}: {len(completed)} completed jobs, expected {n}"
logs = (run / ".snakemake/slurm_logs").rglob("*.log")
per_rule = collections.Counter(p.relative_to(run / ".snakemake/slurm_logs").parts[0].removeprefix("rule_") for p in logs)
assert per_rule == planned, f"per-job Slurm logs {dict(per_rule)}"

steps = yaml.safe_load((run / "ci.yaml").read_text())["train"]["steps"]
ckpt = torch.load(run / "results/models/demo/checkpoint.pt", map_location="cpu", weights_only=True)
assert ckpt["step"] == steps, (ckpt["step"], steps)
assert (run / f"state/models/demo/step_{steps:07d}.pt").is_file()
items = [it for s in (0, 1) for it in read_json(run / f"results/synthetic/eval/shard_{s}.json")["items"]]
assert items, "the eval run made no volume"
for it in items:
    image = nib.load(run / it["image"])
    assert image.shape == (32, 32, 32) and image.get_data_dtype() == np.int16
    prov = read_json(run / it["provenance"])
    assert prov["run"] == "eval" and prov["device"] == "cpu" and not it["skipped"]
print(f"[slurm_test] results ok: {n} Slurm jobs {dict(ran)}, all COMPLETED; checkpoint at step {steps}; "
      f"{len(items)} eval volume(s) from 2 shard jobs")
EOF
log "PASS: the workflow ran on a real Slurm; snakemake wall time ${wall}s"
