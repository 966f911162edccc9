import ArgumentParser

@main
struct Phalanx: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "phalanx",
        abstract: "Sliding Window Recurrences and the Phalanx layer: operators, benchmarks, tools.",
        subcommands: [TrainCommand.self, EvalCommand.self, GenerateCommand.self, InspectCommand.self, Bench.self, FuzzCommand.self,
                      HorizonCommand.self])
}
