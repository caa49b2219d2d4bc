#!/bin/bash
# Example SLURM batch job: pixel-sharded galdecomp fit at nside 256 on 16 ranks.
# Submit with:  sbatch runs/slurm_fit.sh /path/to/catalog.yaml /scratch/$USER/run256
# Resubmitting the same command continues a killed or timed-out run (--resume); the number of
# ranks may differ between submissions.
# The configuration is nside256.yaml in $CONFIG_DIR: by default $SLURM_SUBMIT_DIR/runs (submit from
# the project folder, as above: sbatch runs a copy of this script from its spool folder, so the
# script's own folder is not the project's), or the script's folder when run outside SLURM
# (bash runs/slurm_fit.sh ...). Set CONFIG_DIR to use another folder.
# SLURM writes the job's output to galdecomp-<job id>.log in the submit folder (each log line
# with its clock time). On a file system without locks, add --no-lock (at your own risk).
#SBATCH --job-name=galdecomp
#SBATCH --nodes=1
#SBATCH --ntasks=16
#SBATCH --cpus-per-task=1
#SBATCH --mem-per-cpu=2G
#SBATCH --time=04:00:00
#SBATCH --signal=INT@120
#SBATCH --output=galdecomp-%j.log
set -euo pipefail
CATALOG=${1:?catalog.yaml}
RUN=${2:?run folder}
if [ -n "${SLURM_SUBMIT_DIR:-}" ]; then
    CONFIG_DIR=${CONFIG_DIR:-$SLURM_SUBMIT_DIR/runs}
else
    CONFIG_DIR=${CONFIG_DIR:-$(dirname "$0")}
fi
CONFIG="$CONFIG_DIR/nside256.yaml"
[ -f "$CONFIG" ] || { echo "slurm_fit.sh: error: $CONFIG: not found (submit from the project folder or set CONFIG_DIR)" >&2; exit 2; }
# one BLAS/OpenMP thread per rank: ranks, not threads, use the cores (measured faster)
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# mpi4py must be built against the cluster's MPI:  pip install --no-binary=mpi4py mpi4py
RESUME=""
[ -f "$RUN/checkpoint.npz" ] && RESUME="--resume"
srun galdecomp fit "$CATALOG" --out "$RUN" --config "$CONFIG" $RESUME
