#!/bin/sh
# Entry point of the xaiserve images (run under tini). The first argument picks the process:
#
#   gateway [FLAGS]      xaiserve-server (flags and XAISERVE_* variables, see --help)
#   torchserve [FLAGS]   TorchServe in the foreground with $TS_CONFIG_FILE and the model
#                        store $TS_MODEL_STORE (default /models); writable state (logs, the
#                        temporary directory with worker sockets and extracted archives) goes
#                        under $TS_WORKDIR
#   anything else        run as given (e.g. `python -m xaiserve.model_store.archive ...`)
set -eu

command="${1:-gateway}"
if [ "$#" -gt 0 ]; then shift; fi

case "$command" in
gateway)
    exec xaiserve-server "$@"
    ;;
torchserve)
    workdir="${TS_WORKDIR:-/home/xaiserve/torchserve}"
    mkdir -p "$workdir/logs" "$workdir/tmp"
    cd "$workdir"
    export LOG_LOCATION="${LOG_LOCATION:-$workdir/logs}"
    export METRICS_LOCATION="${METRICS_LOCATION:-$workdir/logs}"
    export TEMP="${TEMP:-$workdir/tmp}"
    export TMPDIR="${TMPDIR:-$workdir/tmp}"
    exec torchserve --start --foreground --ncs \
        --ts-config "${TS_CONFIG_FILE:-/etc/xaiserve/torchserve/config.properties}" \
        --model-store "${TS_MODEL_STORE:-/models}" "$@"
    ;;
*)
    exec "$command" "$@"
    ;;
esac
