# $1: 0 on removal, 1 on upgrade (the service keeps running then).
if [ "$1" -eq 0 ]; then
    /usr/libexec/pinner/pinner-maint remove
fi
