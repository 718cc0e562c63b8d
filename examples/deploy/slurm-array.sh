#!/bin/bash
# synthaug on Slurm: a job array of 10 shards, at most 4 running at once, all writing to
# one OUT on a shared filesystem. Submit from the folder that holds examples/deploy/:
#   sbatch examples/deploy/slurm-array.sh
# then, once every task has ended:
#   synthaug status /shared/synthaug/nightly
#   synthaug merge /shared/synthaug/nightly      # folds the 10 shard manifests into one
#
# OUT must be on a filesystem every node mounts, and one that supports flock (NFSv4,
# CephFS, GPFS; Lustre mounted with -o flock): each shard locks its own part of OUT.
# Where flock is missing, a task killed outright leaves a lock that someone must delete
# by hand (the exit-2 message names the file).
#
# The key: $HOME/.config/synthaug/env holds OPENAI_API_KEY=... (chmod 600), read below.
#
# Exit codes (sacct -j JOBID --format=JobID,State,ExitCode): 0 done; 4 this shard's
# budget is spent (Slurm shows FAILED, but it is a normal stop: submit again later to
# go on); 143 stopped at the time limit after a clean checkpoint (resubmit to resume);
# 1 some items failed for good (a resubmit retries them); 2 bad spec, missing key or
# the shard already running (nothing was sent) and 3 fatal API answer or quota: do not
# resubmit before a human has looked. To rerun only some shards, keep N:
#   sbatch --array=3,7 examples/deploy/slurm-array.sh
#
# Spend: each shard is a run with its own run.max_cost_usd. Shards sharing one key share
# its quota (see the README).
#SBATCH --job-name=synthaug-nightly
#SBATCH --array=0-9%4
#SBATCH --time=06:00:00
#SBATCH --cpus-per-task=2
#SBATCH --mem=2G
#SBATCH --output=synthaug-%A_%a.log
# SIGTERM to the script 5 minutes before the time limit: synthaug (exec'd below, so it
# is the script) starts nothing new, lets in-flight requests finish within the spec's
# run.grace_period_s (60 s), checkpoints and exits 143.
#SBATCH --signal=B:TERM@300

set -euo pipefail
cd "${SLURM_SUBMIT_DIR}"
set -a
. "${HOME}/.config/synthaug/env"
set +a

# N is 10, the size of --array=0-9 above, written out rather than taken from
# $SLURM_ARRAY_TASK_COUNT: a resubmission of some shards (--array=3,7) must keep N.
exec synthaug run examples/deploy/nightly.yaml --shard "${SLURM_ARRAY_TASK_ID}/10" --out /shared/synthaug/nightly --no-progress
