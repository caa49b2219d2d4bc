#!/bin/bash
# Example SLURM batch job: pixel-sharded galdecomp fit at nside 256 on 16 ranks.
# Submit with:  sbatch runs/slurm_fit.sh /path/to/catalog.yaml /scratch/$USER/run256
# Resubmitting the same command continues a killed or timed-out run (--resume); the number of
# ranks may differ between submissions.
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
# one BLAS/OpenMP thread per rank: ranks, not threads, use the cores (measured faster)
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# mpi4py must be built against the cluster's MPI:  pip install --no-binary=mpi4py mpi4py
RESUME=""
[ -f "$RUN/checkpoint.npz" ] && RESUME="--resume"
srun galdecomp fit "$CATALOG" --out "$RUN" --config "$(dirname "$0")/nside256.yaml" $RESUME
