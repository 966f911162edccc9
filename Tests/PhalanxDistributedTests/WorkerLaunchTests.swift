import Foundation
import PhalanxDistributed
import Testing

@Suite("Single-host worker launch (--gpus N)", .serialized)
struct WorkerLaunchTests {
    @Test("N worker environments: torchrun variables, rank = local rank = GPU, 127.0.0.1, one port, multicast off")
    func environments() throws {
        let port = try WorkerLaunch.freePort()
        #expect((1...65535).contains(port))
        let environments = WorkerLaunch.environments(gpus: 3, port: port, base: ["PATH": "/bin", "RANK": "9"])
        #expect(environments.count == 3)
        for (rank, environment) in environments.enumerated() {
            #expect(environment["PATH"] == "/bin" && environment["NCCL_NVLS_ENABLE"] == "0")
            let launch = try LaunchEnvironment.detect(environment)
            #expect(launch == (try LaunchEnvironment(launcher: .torchrun, rank: rank, worldSize: 3, localRank: rank,
                                                     masterAddress: "127.0.0.1", masterPort: port)))
            #expect(launch.deviceOrdinal == rank)
        }
        #expect(WorkerLaunch.environments(gpus: 1, port: 1, base: ["NCCL_NVLS_ENABLE": "1"])[0]["NCCL_NVLS_ENABLE"] == "1")
    }

    @Test("workers run with their own environment; all succeeding returns")
    func success() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("phalanx-workers-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let environments = WorkerLaunch.environments(gpus: 2, port: 5000, base: ["OUT": folder.path])
        try WorkerLaunch.run("/bin/sh", arguments: ["-c", "echo $RANK/$WORLD_SIZE/$LOCAL_RANK > $OUT/$RANK"],
                             environments: environments)
        for rank in 0..<2 {
            let text = try String(contentsOf: folder.appendingPathComponent("\(rank)"), encoding: .utf8)
            #expect(text == "\(rank)/2/\(rank)\n")
        }
    }

    @Test("a failing worker stops the others at once and is named with its status")
    func failure() throws {
        let environments = WorkerLaunch.environments(gpus: 3, port: 5000, base: [:])
        let started = Date()
        #expect {
            // Rank 1 fails; ranks 0 and 2 would wait 30 s at a collective.
            try WorkerLaunch.run("/bin/sh",
                                 arguments: ["-c", "if [ $RANK = 1 ]; then sleep 0.2; exit 3; fi; exec sleep 30"],
                                 environments: environments)
        } throws: { error in
            guard let failure = error as? WorkerFailure else { return false }
            return failure.rank == 1 && failure.status == 3 && !failure.signaled
                && "\(error)" == "worker rank 1 exited with status 3; the other workers were stopped"
        }
        #expect(Date().timeIntervalSince(started) < 10)
    }

    @Test("a worker that ignores SIGTERM after another failed is killed when the grace time is up")
    func stubbornWorker() throws {
        let started = Date()
        #expect {
            try WorkerLaunch.run("/bin/sh",
                                 arguments: ["-c", "if [ $RANK = 1 ]; then sleep 0.2; exit 3; fi; trap '' TERM; sleep 30"],
                                 environments: WorkerLaunch.environments(gpus: 2, port: 5000, base: [:]), grace: 0.5)
        } throws: { ($0 as? WorkerFailure)?.rank == 1 }
        #expect(Date().timeIntervalSince(started) < 10)
    }

    @Test("a stop request reaches every worker as SIGTERM once; workers that then exit 0 end the run normally")
    func forwardedStop() throws {
        let started = Date()
        try WorkerLaunch.run("/bin/sh", arguments: ["-c", "trap 'kill $!; exit 0' TERM; sleep 30 & wait"],
                             environments: WorkerLaunch.environments(gpus: 2, port: 5000, base: [:]),
                             stopRequested: { Date().timeIntervalSince(started) > 0.3 })
        #expect(Date().timeIntervalSince(started) < 10)
    }
}
