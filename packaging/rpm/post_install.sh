# $1: 1 on install, 2 on upgrade; both configure.
/usr/libexec/pinner/pinner-maint configure
