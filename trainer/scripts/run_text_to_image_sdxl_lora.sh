#!/usr/bin/env bash
# Shared body of train_1p_text_to_image_sdxl_lora.sh and train_8p_text_to_image_sdxl_lora.sh, which set
# RANK_SIZE (processes, one per device) and ACCELERATE_CONFIG and then source this file.
#
# Conventions of Ascend's ModelZoo test scripts: --key=value overrides, the run's output in
# ./test/output/${ASCEND_DEVICE_ID}/ (relative to the directory the script is started from), the full log
# in train_${ASCEND_DEVICE_ID}.log, and at the end the lines their tooling greps:
#   Final Performance images/sec : <images/s over all devices>
#   Final Train Loss : <loss of the last step>
#   E2E Training Duration sec : <seconds>
# plus <CaseName>.log (Network, RankSize, BatchSize, ActualFPS, ...) and train_<CaseName>_loss.txt.
#
# Overrides (defaults: Ascend's recipe):
#   --model_name=       pretrained SDXL pipeline   (stabilityai/stable-diffusion-xl-base-1.0)
#   --vae_name=         separate VAE                (madebyollin/sdxl-vae-fp16-fix)
#   --dataset_name=     dataset                     (lambdalabs/pokemon-blip-captions)
#   --batch_size=       per-device batch            (1)
#   --max_train_steps=  optimizer steps             (1000; 200 is Ascend's performance run)
#   --mixed_precision=  no | fp16 | bf16            (no, i.e. fp32)
#   --resolution=       pixels                      (1024)
#   --num_processes=    devices (8p script)         (RANK_SIZE)
#   --output_dir=       where everything goes       (./test/output/${ASCEND_DEVICE_ID})
# An empty --model_name= / --dataset_name= / --vae_name= drops the flag: the trainer then uses its
# embedded tiny pipeline / shapes dataset / the model's own VAE (a CPU smoke test in seconds).
# Any other argument (e.g. --cache_latents, --resume_from_checkpoint=latest) goes to the trainer as is,
# after the defaults, so it also overrides them.

Network="text_to_image_sdxl_lora"
model_name="stabilityai/stable-diffusion-xl-base-1.0"
vae_name="madebyollin/sdxl-vae-fp16-fix"
dataset_name="lambdalabs/pokemon-blip-captions"
batch_size=1
max_train_steps=1000
mixed_precision="no"
resolution=1024
num_processes="${RANK_SIZE}"
output_dir=""
extra_args=()
for para in "$@"; do
    case "$para" in
        --model_name=*) model_name="${para#*=}" ;;
        --vae_name=*) vae_name="${para#*=}" ;;
        --dataset_name=*) dataset_name="${para#*=}" ;;
        --batch_size=*) batch_size="${para#*=}" ;;
        --max_train_steps=*) max_train_steps="${para#*=}" ;;
        --mixed_precision=*) mixed_precision="${para#*=}" ;;
        --resolution=*) resolution="${para#*=}" ;;
        --num_processes=*) num_processes="${para#*=}" ;;
        --output_dir=*) output_dir="${para#*=}" ;;
        *) extra_args+=("$para") ;;
    esac
done

cur_path=$(pwd)
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# From a checkout the package is two levels up; an installed package is importable anyway.
export PYTHONPATH="$(cd "${script_dir}/../.." && pwd)${PYTHONPATH:+:${PYTHONPATH}}"
export ASCEND_DEVICE_ID="${ASCEND_DEVICE_ID:-0}"
export RANK_SIZE="${num_processes}"

# Ascend NPU: the CANN environment (unless the platform set it up already) and HCCL timeouts generous
# enough for ranks that load models or write checkpoints at different speeds. Harmless elsewhere.
if [ -z "${ASCEND_TOOLKIT_HOME:-}" ] && [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]; then
    source /usr/local/Ascend/ascend-toolkit/set_env.sh
fi
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1800}"

# Host settings of Ascend's own SDXL training recipes (MindSpeed-MM's examples/diffusers/sdxl scripts);
# each keeps a value already in the environment. torch_npu and CANN read them; elsewhere they do nothing,
# except OMP_NUM_THREADS. Meanings (Ascend Extension for PyTorch / CANN environment-variable reference):
#   TASK_QUEUE_ENABLE=2        operator dispatch in two pipelined stages, level 2 (also moves workspace
#                              allocation and some host work off the dispatching thread)
#   CPU_AFFINITY_CONF=1        bind each process's threads to the CPU cores near its NPU (coarse binding)
#   ACLNN_CACHE_LIMIT=100000   entries of the aclnn operator cache (default 10000): SDXL's many shapes stay cached
#   PYTORCH_NPU_ALLOC_CONF=expandable_segments:True   the caching allocator grows segments instead of
#                              cutting new blocks: less fragmentation (as PYTORCH_CUDA_ALLOC_CONF on CUDA)
#   COMBINED_ENABLE=1          fuse the copies of non-contiguous tensor combinations into one
#   OMP_NUM_THREADS=1          one OpenMP thread per process (8 processes share the host's cores)
: "${TASK_QUEUE_ENABLE:=2}"; export TASK_QUEUE_ENABLE
: "${CPU_AFFINITY_CONF:=1}"; export CPU_AFFINITY_CONF
: "${ACLNN_CACHE_LIMIT:=100000}"; export ACLNN_CACHE_LIMIT
: "${PYTORCH_NPU_ALLOC_CONF:=expandable_segments:True}"; export PYTORCH_NPU_ALLOC_CONF
: "${COMBINED_ENABLE:=1}"; export COMBINED_ENABLE
: "${OMP_NUM_THREADS:=1}"; export OMP_NUM_THREADS

output_path="${output_dir:-${cur_path}/test/output/${ASCEND_DEVICE_ID}}"
mkdir -p "${output_path}"
log="${output_path}/train_${ASCEND_DEVICE_ID}.log"

train_args=()
[ -n "${model_name}" ] && train_args+=("--pretrained_model_name_or_path=${model_name}")
[ -n "${vae_name}" ] && train_args+=("--vae_name=${vae_name}")
[ -n "${dataset_name}" ] && train_args+=("--dataset_name=${dataset_name}" "--caption_column=text")
train_args+=(
    "--resolution=${resolution}" --random_flip
    "--train_batch_size=${batch_size}" --gradient_accumulation_steps=1 --gradient_checkpointing
    "--max_train_steps=${max_train_steps}" --learning_rate=1e-04 --lr_scheduler=constant --lr_warmup_steps=0
    --max_grad_norm=1 "--mixed_precision=${mixed_precision}" --checkpointing_steps=500
    "--output_dir=${output_path}"
    "${extra_args[@]}"
)

start_time=$(date +%s)
echo "start_time: $(date -d @"${start_time}" "+%Y-%m-%d %H:%M:%S" 2>/dev/null || date)"
echo "${RANK_SIZE} process(es), log: ${log}"
"${PYTHON:-python3}" -m accelerate.commands.launch --config_file "${ACCELERATE_CONFIG}" \
    --num_processes "${num_processes}" --mixed_precision "${mixed_precision}" \
    -m trainer.sdxl_lora "${train_args[@]}" > "${log}" 2>&1
rc=$?
end_time=$(date +%s)
e2e_time=$((end_time - start_time))

echo "------------------ Final result ------------------"
FPS=$(grep -a "Final Performance images/sec" "${log}" | awk -F ": " '{print $2}' | tail -n 1)
ActualLoss=$(grep -a "Final Train Loss" "${log}" | awk -F ": " '{print $2}' | tail -n 1)
echo "Final Performance images/sec : ${FPS}"
echo "Final Train Loss : ${ActualLoss}"
echo "E2E Training Duration sec : ${e2e_time}"

if [ "${max_train_steps}" -le 200 ] 2>/dev/null; then mode="perf"; else mode="acc"; fi
CaseName="${Network}_bs${batch_size}_${RANK_SIZE}p_${mode}"
# Milliseconds per optimizer step (the global batch over all devices at the measured images/s).
TrainingTime=$(awk -v b="${batch_size}" -v n="${RANK_SIZE}" -v f="${FPS:-0}" 'BEGIN { if (f > 0) printf "%.2f", b * n * 1000 / f }')
"${PYTHON:-python3}" - "${output_path}/summary.json" > "${output_path}/train_${CaseName}_loss.txt" 2>/dev/null <<'PY'
import json, sys
for loss in json.load(open(sys.argv[1]))["loss_history"]:
    print(loss)
PY
{
    echo "Network = ${Network}"
    echo "RankSize = ${RANK_SIZE}"
    echo "BatchSize = ${batch_size}"
    echo "DeviceType = $(uname -m)"
    echo "CaseName = ${CaseName}"
    echo "ActualFPS = ${FPS}"
    echo "TrainingTime = ${TrainingTime}"
    echo "ActualLoss = ${ActualLoss}"
    echo "E2ETrainingTime = ${e2e_time}"
} > "${output_path}/${CaseName}.log"

if [ "${rc}" -ne 0 ]; then
    echo "training failed (exit status ${rc}); last lines of ${log}:" >&2
    tail -n 20 "${log}" >&2
fi
exit "${rc}"
