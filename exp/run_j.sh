export MLX_ENABLE_TF32=0 PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
timeout 100 python3 tools/ncu_decode.py 2048x1,8192x1,32768x1,2048x4,32768x16 --splits 2,8,32 --variants U4QT4,U2QT2L8,U2QT4L8 --csv $OUT/probe.csv 2>&1 | grep -v "^==PROF==" | tail -6
python3 exp/decide.py $OUT/probe.csv || exit 0
python3 exp/apply_lanes.py
PAGEDKV_KERNEL_LOG=$OUT/kernel-cases.log timeout 150 python3 -m pytest tests/parity/test_kernel_parity.py tests/parity/test_placeholders.py -x -p no:cacheprovider > $OUT/kernel.log 2>&1; rc=$?; echo "parity rc $rc"; tail -3 $OUT/kernel.log
[ $rc = 0 ] || exit 0
timeout 100 python3 -m pagedkv bench throughput --full --repeats 3 --out $OUT/tp 2>&1 | grep -A6 "^CSV"
