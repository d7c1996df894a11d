# $1: 0 after removal. rpm keeps a changed config as .rpmsave; runtime state goes.
if [ "$1" -eq 0 ]; then
    rm -rf /run/pinner
    if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
