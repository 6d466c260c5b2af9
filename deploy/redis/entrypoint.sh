#!/bin/sh
# Like the official redis image's entrypoint: options alone are given to redis-server, and
# redis-server listens on every interface of the container without protected mode (the official
# image is built so; Debian's default would refuse connections from other containers).
set -eu
case "${1:-redis-server}" in
    -*) set -- redis-server "$@" ;;
esac
if [ "${1:-redis-server}" = "redis-server" ]; then
    [ "$#" -gt 0 ] && shift
    set -- redis-server --bind 0.0.0.0 --protected-mode no --dir /data "$@"
fi
exec "$@"
