from whisper_exporter.cli import main

main()
