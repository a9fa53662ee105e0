#!/usr/bin/env bash
# Every GPU check of the project in one short run (a few minutes on an H200-class host):
# the CUDA tests, the teachers' forward with a profile, and the label-worker bench with real teachers.
#
#   bench/gpu_checks.sh OUT_DIR [CLIPS]
#
# Needs torch with CUDA and the package's data dependencies (decord, av, webdataset, opencv, pyarrow);
# not Prefect. PSEUDOTRACK_SHARED points at the shared folder (videos, reference cases) when it is not
# ../shared. Each step has its own time limit, so one that hangs does not cost the others.
set -u
out=${1:?usage: bench/gpu_checks.sh OUT_DIR [CLIPS]}
clips=${2:-64}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...: run, keep its log, say how it ended
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s"
    tail -n 4 "$out/$name.log"
}
nvidia-smi -L; nproc
$py -c "import torch, decord, av, webdataset, cv2; print('torch', torch.__version__, torch.cuda.get_device_name())"
step worker_cotracker3_offline 170 $py bench/bench_label_worker.py --teacher cotracker3_offline --device cuda \
    --clips "$clips" --sequential-clips 8
step teachers 100 $py bench/bench_teachers.py --teachers cotracker3_offline cotracker3_online tapir --device cuda \
    --repeat 3 --profile
step teachers_batch4 60 $py bench/bench_teachers.py --teachers cotracker3_offline tapir --device cuda --repeat 3 \
    --batch 4
step gpu_tests 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/test_pipeline_cuda.py \
    tests/test_teacher_cotracker3.py tests/test_teacher_cotracker2.py tests/test_teacher_tapir.py \
    tests/test_teacher_batching.py
step worker_tapir 110 $py bench/bench_label_worker.py --teacher tapir --device cuda --clips "$clips" --sequential-clips 8
step worker_cotracker3_online 130 $py bench/bench_label_worker.py --teacher cotracker3_online --device cuda \
    --clips "$clips" --sequential-clips 8
