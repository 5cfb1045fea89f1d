#compdef hybridctl

_hybridctl_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _HYBRIDCTL_COMPLETE=complete_zsh hybridctl)
}

compdef _hybridctl_completion hybridctl