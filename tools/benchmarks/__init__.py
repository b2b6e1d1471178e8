"""tools/bench as a package: `common` (targets, mounting, clean-up, sizes,
cache dropping, fio), `arrays` (what the groups with an array of their own
share: a mount driven through fusearray.ctlclient), one module per group
(`fio`, `ext4`, `snap`, `packs`, `transport`), `report` (the tables) and
`main` (the options and the run). `tools/bench` is the command."""
