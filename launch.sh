#!/usr/bin/env bash
# One launch line per hardware setup. Any recipe field can be overridden with --key value after the recipe.
#
#   ./launch.sh tiny                      # the CPU default: tiny model, synthetic data, no download
#   ./launch.sh single_gpu single_head    # one GPU, the paper's single-head recipe
#   ./launch.sh ddp all_heads --beta 0.3  # 8 GPUs, data parallel
#   ./launch.sh zero3 all_heads           # DeepSpeed ZeRO-3
#   ./launch.sh fsdp all_heads            # FSDP
#   ./launch.sh cpu_2proc tiny            # two processes on a CPU (how the tests check multi-process runs)
#
# The whole study (probe, ITI, every family's training, evaluation, report) on every process of a launch:
#   ./launch.sh study ddp probe_heads_16                      # one node of 8 GPUs (accelerate_configs/ddp.yaml)
#   ./launch.sh study multinode probe_heads_16 --machine_rank 1 --main_process_ip HEAD   # on each of several nodes
#   ./launch.sh study cpu_2proc toy                           # two processes on a CPU
#
# Sweeps (recipes/sweeps/*.yaml are W&B grid sweep files):
#   ./launch.sh wandb-sweep recipes/sweeps/tau_all_heads.yaml    # create the sweep in W&B, then one agent per GPU
#   ./launch.sh wandb-agents ENTITY/PROJECT/SWEEP_ID             # one more agent per GPU for an existing sweep
#   ./launch.sh sweep recipes/sweeps/tau_all_heads.yaml          # the same grid without W&B: locedit sweep
set -euo pipefail
cd "$(dirname "$0")"

# One `wandb agent` per visible GPU, each pinned to its GPU; waits for all of them.
wandb_agents() {
    local sweep_id=$1 gpus
    gpus=$(python -c "import torch; print(' '.join(map(str, range(torch.cuda.device_count()))) or '')")
    [ -n "$gpus" ] || { echo "launch.sh: no GPU visible; run 'wandb agent $sweep_id' yourself" >&2; exit 2; }
    for gpu in $gpus; do
        CUDA_VISIBLE_DEVICES=$gpu wandb agent "$sweep_id" &
    done
    wait
}

setup=${1:?usage: ./launch.sh SETUP [RECIPE] [--key value ...] (SETUP: tiny, single_gpu, ddp, zero3, fsdp, cpu_2proc, study, sweep, wandb-sweep, wandb-agents)}
shift
case "$setup" in
    study)
        config=accelerate_configs/${1:?usage: ./launch.sh study CONFIG RECIPE [--machine_rank R --main_process_ip IP] [--key value ...]}.yaml
        recipe=recipes/${2:?usage: ./launch.sh study CONFIG RECIPE [--key value ...]}.yaml
        shift 2
        [ -f "$config" ] || { echo "launch.sh: no accelerate config '$config'" >&2; exit 2; }
        [ -f "$recipe" ] || { echo "launch.sh: no recipe '$recipe'" >&2; exit 2; }
        launch=()  # the launcher's own flags (multi-node), the rest go to the study
        while [ $# -gt 0 ] && { [ "$1" = --machine_rank ] || [ "$1" = --main_process_ip ]; }; do
            launch+=("$1" "${2:?}"); shift 2
        done
        exec accelerate launch --config_file "$config" "${launch[@]}" -m locedit.study "$recipe" "$@" ;;
    tiny) exec python -m locedit.train recipes/tiny.yaml "$@" ;;
    sweep) exec python -m locedit.sweep "$@" ;;
    wandb-agents) wandb_agents "${1:?usage: ./launch.sh wandb-agents SWEEP_ID}"; exit ;;
    wandb-sweep)
        file=${1:?usage: ./launch.sh wandb-sweep SWEEP_FILE}
        python -m locedit.sweep "$file" --dry_run >/dev/null  # every run's flags parse before W&B sees the sweep
        sweep_id=$(wandb sweep --project "${WANDB_PROJECT:-locedit}" "$file" 2>&1 | tee /dev/stderr \
            | sed -n 's/.*wandb agent \([^ ]*\).*/\1/p' | tail -n 1)
        [ -n "$sweep_id" ] || { echo "launch.sh: wandb sweep gave no sweep id" >&2; exit 2; }
        wandb_agents "$sweep_id"; exit ;;
esac
recipe=${1:?usage: ./launch.sh $setup RECIPE [--key value ...]}
shift
config=accelerate_configs/$setup.yaml
[ -f "$config" ] || { echo "launch.sh: no accelerate config '$config'" >&2; exit 2; }
[ -f "recipes/$recipe.yaml" ] || { echo "launch.sh: no recipe 'recipes/$recipe.yaml'" >&2; exit 2; }
exec accelerate launch --config_file "$config" -m locedit.train "recipes/$recipe.yaml" "$@"
