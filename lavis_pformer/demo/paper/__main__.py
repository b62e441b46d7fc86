from lavis_pformer.demo.paper.cli import main

main()
