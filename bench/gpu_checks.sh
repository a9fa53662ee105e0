#!/usr/bin/env bash
# Every GPU check of the project in one short run (a few minutes on an H200-class host):
# the CUDA tests, the teachers' forward with a profile, the calibration's cost, and the label-worker
# bench with real teachers.
#
#   bench/gpu_checks.sh OUT_DIR [CLIPS]
#   STEPS="worker_cotracker3_offline gpu_tests" bench/gpu_checks.sh OUT_DIR     # only these steps
#
# Needs torch with CUDA and the package's data dependencies (decord, av, webdataset, opencv, pyarrow);
# not Prefect. PSEUDOTRACK_SHARED points at the shared folder (videos, reference cases) when it is not
# ../shared. Each step has its own time limit, so one that hangs does not cost the others; each keeps
# its log in OUT_DIR/<step>.log.
set -u
out=${1:?usage: bench/gpu_checks.sh OUT_DIR [CLIPS]}
clips=${2:-64}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() {  # step NAME SECONDS CMD...: run (when STEPS is empty or names it), keep its log, say how it ended
    local name=$1 limit=$2
    shift 2
    case " ${STEPS:-$name} " in *" $name "*) ;; *) return 0 ;; esac
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s"
    tail -n 4 "$out/$name.log"
}
worker() {  # worker TEACHER SECONDS
    step "worker_$1" "$2" $py bench/bench_label_worker.py --teacher "$1" --device cuda --clips "$clips" \
        --sequential-clips 8
}
nvidia-smi -L; nproc
$py -c "import torch, decord, av, webdataset, cv2; print('torch', torch.__version__, torch.cuda.get_device_name())"
worker cotracker3_offline 95
step gpu_tests 60 $py -m pytest -q -p no:cacheprovider -m gpu tests/test_pipeline_cuda.py \
    tests/test_teacher_cotracker3.py tests/test_teacher_cotracker2.py tests/test_teacher_tapir.py \
    tests/test_teacher_batching.py
step calibration 45 $py bench/bench_calibration.py --teachers lk cotracker3_offline cotracker3_online tapir \
    --device cuda
worker cotracker3_online 85
worker tapir 85
step teachers 60 $py bench/bench_teachers.py --teachers cotracker3_offline cotracker3_online tapir --device cuda \
    --repeat 3 --profile
step teachers_batch4 40 $py bench/bench_teachers.py --teachers cotracker3_offline tapir --device cuda --repeat 3 \
    --batch 4
