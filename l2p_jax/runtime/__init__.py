"""Runtime helpers the programs share: the device mesh (`sharding`), multi-process
start-up (`distributed`), command-line config errors (`cli`), metrics files (`metrics`)
and plots (`plots`)."""
