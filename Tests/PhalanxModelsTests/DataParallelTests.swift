import Foundation
import PhalanxData
import PhalanxDistributed
import PhalanxLayers
import PhalanxModels
import PhalanxRuntime
import PhalanxTestSupport
import PhalanxTraining
import Testing

/// Runs `body(communicator)` for every rank of `group` on threads of its own; the results in rank order.
private func onRanks<T: Sendable>(_ group: LocalCommunicatorGroup, _ body: @escaping @Sendable (LocalCommunicator) throws -> T) -> [Result<T, Error>] {
    let results = Locked<[Result<T, Error>?]>(Array(repeating: nil, count: group.worldSize))
    let done = DispatchGroup()
    for rank in 0..<group.worldSize {
        done.enter()
        let thread = Thread {
            let result = Result { try body(group.communicator(rank: rank)) }
            results.update { $0[rank] = result }
            done.leave()
        }
        thread.stackSize = 8 << 20
        thread.start()
    }
    done.wait()
    return results.value.map { $0! }
}

/// A value shared by the rank threads.
private final class Locked<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var stored: Value
    init(_ value: Value) { stored = value }
    var value: Value { lock.withLock { stored } }
    func update(_ body: (inout Value) -> Void) { lock.withLock { body(&stored) } }
}

/// The training settings of these tests: a global batch of 4 sequences of 24 tokens, two
/// micro-batches per step, dropout on.
private func parallelTraining(steps: Int = 6) -> TrainingConfiguration {
    var training = TrainingConfiguration()
    training.steps = steps
    training.batchSize = 4
    training.contextLength = 24
    training.accumulation = 2
    training.warmupSteps = 2
    training.evaluationInterval = 0
    training.checkpointInterval = 0
    training.dropout = 0.2
    return training
}

/// A fresh trainer of the tiny PSA model (seed 7) in `folder`, as one rank of `communicator`'s run
/// (nil: a single process).
private func freshTrainer(_ training: TrainingConfiguration, data: TokenFile, folder: URL,
                          communicator: (any Communicator)?) throws -> Trainer {
    let model = try LanguageModel(tinyConfiguration(), seed: 7)
    let state = TrainingState(configuration: training, samplerSeed: 9, dataPath: "", tokenizer: try ByteTokenizer().serialized(),
                              modelSeed: 7)
    return try Trainer(model: model, optimizer: AdamW(model.parameters, hyperparameters: training.optimizer), state: state,
                       data: data, runFolder: folder,
                       parallel: try communicator.map { try DataParallel(communicator: $0, parameters: model.parameters) })
}

/// Losses of a run, and its final weights by parameter.
private struct RunOutcome: Sendable {
    var losses: [Float] = []
    var weights: [[Float]] = []
    var outcome: Trainer.Outcome = .finished
}

private func train(_ trainer: Trainer, stopAfter: Int? = nil) throws -> RunOutcome {
    var run = RunOutcome()
    run.outcome = try trainer.run(stopRequested: { run.losses.count == stopAfter }, onStep: { run.losses.append($0.loss) },
                                  onEvaluation: { _ in })
    run.weights = trainer.model.parameters.map(\.value.array)
    return run
}

@Suite("Data-parallel training (ranks as threads, the in-process communicator)")
struct DataParallelTests {
    @Test("W ranks, each on B/W of every batch, train the single-process run: same losses and weights to rounding, identical on every rank",
          arguments: [2, 4])
    func matchesOneProcess(worldSize: Int) throws {
        let (tokens, folder) = try syntheticTokenFile()
        defer { try? FileManager.default.removeItem(at: folder) }
        let training = parallelTraining()
        let single = try train(try freshTrainer(training, data: tokens, folder: folder.appendingPathComponent("single"), communicator: nil))
        let ranks = try onRanks(LocalCommunicatorGroup(worldSize: worldSize, timeout: 60)) { communicator in
            try train(try freshTrainer(training, data: tokens, folder: folder.appendingPathComponent("parallel"), communicator: communicator))
        }.map { try $0.get() }
        for rank in ranks {
            #expect(rank.losses == ranks[0].losses, "every rank reports the global batch's loss")
            #expect(rank.weights == ranks[0].weights, "every rank takes the same steps")
        }
        // The global batch's loss and gradient, summed in another order: float32 rounding apart.
        #expect(ranks[0].losses.count == training.steps)
        for (a, b) in zip(ranks[0].losses, single.losses) { #expect(abs(a - b) <= 2e-5 * abs(b), "loss \(a) against \(b)") }
        for (a, b) in zip(ranks[0].weights, single.weights) {
            let scale = b.map(abs).max() ?? 1
            #expect(zip(a, b).allSatisfy { abs($0 - $1) <= 1e-4 * scale })
        }
        #expect(ranks[0].losses.last! < ranks[0].losses.first!)
    }

    @Test("a stop asked of one rank stops every rank after the same step; rank 0 alone saves; resuming on as many ranks continues exactly, on another number from the same step")
    func stopAndResume() throws {
        let (tokens, folder) = try syntheticTokenFile()
        defer { try? FileManager.default.removeItem(at: folder) }
        let training = parallelTraining()
        let straight = try onRanks(LocalCommunicatorGroup(worldSize: 2)) { communicator in
            try train(try freshTrainer(training, data: tokens, folder: folder.appendingPathComponent("straight"), communicator: communicator))
        }.map { try $0.get() }[0]

        let run = folder.appendingPathComponent("split")
        let first = try onRanks(LocalCommunicatorGroup(worldSize: 2)) { communicator in
            try train(try freshTrainer(training, data: tokens, folder: run, communicator: communicator),
                      stopAfter: communicator.rank == 1 ? 3 : nil)
        }.map { try $0.get() }
        #expect(first.map(\.outcome) == [.interrupted(step: 3), .interrupted(step: 3)])
        let (_, _, saved) = try TrainingCheckpoint.load(from: TrainingRun.checkpointURL(in: run))
        #expect(saved.step == 3 && saved.worldSize == 2)

        let copy = folder.appendingPathComponent("split-copy")
        try FileManager.default.createDirectory(at: copy, withIntermediateDirectories: true)
        try FileManager.default.copyItem(at: TrainingRun.checkpointURL(in: run), to: TrainingRun.checkpointURL(in: copy))
        @Sendable func resumed(_ communicator: (any Communicator)?, in run: URL) throws -> RunOutcome {
            let (model, optimizer, state) = try TrainingCheckpoint.load(from: TrainingRun.checkpointURL(in: run))
            let trainer = try Trainer(model: model, optimizer: optimizer, state: state, data: tokens, runFolder: run,
                                      checkpointStep: state.step,
                                      parallel: try communicator.map { try DataParallel(communicator: $0, parameters: model.parameters) })
            return try train(trainer)
        }
        let second = try onRanks(LocalCommunicatorGroup(worldSize: 2)) { try resumed($0, in: run) }.map { try $0.get() }[0]
        #expect(first[0].losses + second.losses == straight.losses, "same ranks: bit for bit")
        #expect(second.weights == straight.weights)

        let onOne = try resumed(nil, in: copy)
        #expect(onOne.losses.count == training.steps - 3, "continues from global step 3")
        for (a, b) in zip(onOne.losses, straight.losses.dropFirst(3)) { #expect(abs(a - b) <= 2e-5 * abs(b)) }
    }

    @Test("a rank that fails makes the others stop with its reason; a rank that stops answering is named after the timeout; the checkpoint stays intact")
    func failures() throws {
        let (tokens, folder) = try syntheticTokenFile()
        defer { try? FileManager.default.removeItem(at: folder) }
        let training = { var t = parallelTraining(); t.checkpointInterval = 2; return t }()
        let run = folder.appendingPathComponent("failing")
        let group = LocalCommunicatorGroup(worldSize: 2, timeout: 20)
        let results = onRanks(group) { communicator in
            let trainer = try freshTrainer(training, data: tokens, folder: run, communicator: communicator)
            return try trainer.run(stopRequested: { false }, onStep: { report in
                if communicator.rank == 1 && report.step == 3 { group.fail("rank 1 died (out of memory)") }
            }, onEvaluation: { _ in })
        }
        for result in results {
            #expect { try result.get() } throws: { "\($0)".contains("rank 1 died") }
        }
        let (_, _, saved) = try TrainingCheckpoint.load(from: TrainingRun.checkpointURL(in: run))
        #expect(saved.step == 2)

        let silent = LocalCommunicatorGroup(worldSize: 2, timeout: 1)
        let started = Date()
        let stalled = onRanks(silent) { communicator -> Trainer.Outcome in
            let trainer = try freshTrainer(training, data: tokens, folder: folder.appendingPathComponent("stalled"), communicator: communicator)
            guard communicator.rank == 0 else { return .finished }  // rank 1 never trains
            return try trainer.run(stopRequested: { false }, onStep: { _ in }, onEvaluation: { _ in })
        }
        #expect { try stalled[0].get() } throws: { "\($0)".contains("rank 1 did not arrive") }
        #expect(Date().timeIntervalSince(started) < 30)
    }

    @Test("through TrainingRun: rank 0 prepares the folder and the others follow; rank 0's refusal reaches every rank")
    func startingARun() throws {
        let root = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: root) }
        let corpus = root.appendingPathComponent("corpus.txt")
        try syntheticText().write(to: corpus, atomically: true, encoding: .utf8)
        var model = tinyConfiguration()
        model.vocabulary = 256
        let plan = TrainingRun.Plan(model: model, training: parallelTraining(steps: 2), files: [corpus], seed: 3)
        let run = root.appendingPathComponent("run")
        let losses = try onRanks(LocalCommunicatorGroup(worldSize: 2)) { communicator in
            try train(try TrainingRun.start(plan, in: run, communicator: communicator)).losses
        }.map { try $0.get() }
        #expect(losses[0] == losses[1] && losses[0].count == 2)
        #expect(FileManager.default.fileExists(atPath: TrainingRun.tokensURL(in: run).path))
        #expect(try FileManager.default.contentsOfDirectory(atPath: run.path).allSatisfy { !$0.hasSuffix(".partial") })

        let again = onRanks(LocalCommunicatorGroup(worldSize: 2)) { communicator in
            try TrainingRun.start(plan, in: run, communicator: communicator).state.step
        }
        #expect { try again[0].get() } throws: { ($0 as? TrainingError)?.field == "overwrite" }
        #expect { try again[1].get() } throws: { "\($0)".contains("rank 0 could not start the run") && "\($0)".contains("already holds a checkpoint") }
    }
}
