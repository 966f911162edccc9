import PhalanxDistributed
import Testing

@Suite("Launch environment: torchrun, Open MPI, Slurm")
struct LaunchEnvironmentTests {
    @Test("no launcher variables: one process, rank 0 of 1")
    func single() throws {
        let launch = try LaunchEnvironment.detect(["HOME": "/root"])
        #expect(launch.launcher == .single && launch.rank == 0 && launch.worldSize == 1 && launch.localRank == 0)
        #expect(launch.masterAddress == nil && launch.masterPort == LaunchEnvironment.defaultPort)
    }

    @Test("torchrun-style variables")
    func torchrun() throws {
        let launch = try LaunchEnvironment.detect(["RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                                   "MASTER_ADDR": "node7", "MASTER_PORT": "1234"])
        #expect(launch == (try LaunchEnvironment(launcher: .torchrun, rank: 3, worldSize: 4, localRank: 1,
                                                 masterAddress: "node7", masterPort: 1234)))
        #expect(launch.deviceOrdinal == 1)
        #expect("\(launch)" == "rank 3 of 4 (local 1, torchrun), rendezvous node7:1234")
    }

    @Test("Open MPI variables, with MASTER_ADDR; the port defaults to 29500")
    func openMPI() throws {
        let launch = try LaunchEnvironment.detect(["OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                                                   "OMPI_COMM_WORLD_LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1"])
        #expect(launch.launcher == .openMPI && launch.rank == 1 && launch.worldSize == 2 && launch.localRank == 1)
        #expect(launch.masterAddress == "10.0.0.1" && launch.masterPort == 29500)
    }

    @Test("Slurm variables; without MASTER_ADDR the first host of the node list")
    func slurm() throws {
        let base = ["SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"]
        let fromList = try LaunchEnvironment.detect(base.merging(["SLURM_JOB_NODELIST": "gpu[03-04,07],login1"]) { $1 })
        #expect(fromList.launcher == .slurm && fromList.rank == 5 && fromList.worldSize == 8 && fromList.localRank == 1)
        #expect(fromList.masterAddress == "gpu03")
        let older = try LaunchEnvironment.detect(base.merging(["SLURM_NODELIST": "a1,a2"]) { $1 })
        #expect(older.masterAddress == "a1")
        let explicit = try LaunchEnvironment.detect(base.merging(["SLURM_JOB_NODELIST": "gpu[03-04]", "MASTER_ADDR": "head"]) { $1 })
        #expect(explicit.masterAddress == "head")
    }

    @Test("precedence: RANK over Open MPI over Slurm (mpirun inside a Slurm job)")
    func precedence() throws {
        let slurm = ["SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"]
        let mpi = ["OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "MASTER_ADDR": "n1"]
        let underMPI = try LaunchEnvironment.detect(slurm.merging(mpi) { $1 })
        #expect(underMPI.launcher == .openMPI && underMPI.rank == 2 && underMPI.worldSize == 4)
        let explicit = try LaunchEnvironment.detect(slurm.merging(mpi) { $1 }.merging(["RANK": "1", "WORLD_SIZE": "2"]) { $1 })
        #expect(explicit.launcher == .torchrun && explicit.rank == 1 && explicit.worldSize == 2)
    }

    @Test("inconsistent or malformed values are errors naming the variable", arguments: [
        (["RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h"], "rank 2 is not in 0 ..< 2"),
        (["RANK": "0", "WORLD_SIZE": "0"], "world size is 0"),
        (["RANK": "x1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"], "RANK=x1 is not a whole number"),
        (["RANK": "1"], "RANK is set (1) but WORLD_SIZE is not"),
        (["RANK": "1", "WORLD_SIZE": "2"], "set MASTER_ADDR"),
        (["OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"], "open-mpi: 2 ranks need a rendezvous host"),
        (["SLURM_PROCID": "0", "SLURM_NTASKS": "2"], "SLURM_JOB_NODELIST"),
        (["RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"], "MASTER_PORT 70000 is not a TCP port"),
        (["RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"], "MASTER_PORT=http is not a whole number"),
        (["RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "-1", "MASTER_ADDR": "h"], "local rank -1 is negative"),
        (["SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[03-04"], "unbalanced brackets"),
    ])
    func errors(environment: [String: String], message: String) {
        #expect { try LaunchEnvironment.detect(environment) } throws: { error in
            guard let error = error as? LaunchEnvironmentError else { return false }
            return error.message.contains(message)
        }
    }

    @Test("Slurm node lists: the first host, digits as written, several groups, commas inside brackets")
    func nodeLists() throws {
        #expect(try SlurmNodeList.firstHost("node[01-04,07]") == "node01")
        #expect(try SlurmNodeList.firstHost("node[7,1-3]") == "node7")
        #expect(try SlurmNodeList.firstHost("login2") == "login2")
        #expect(try SlurmNodeList.firstHost("a1,b[1-2]") == "a1")
        #expect(try SlurmNodeList.firstHost("rack[2-3]-gpu[001-004]-ib") == "rack2-gpu001-ib")
        #expect(try SlurmNodeList.firstHost(" gpu[10-11],cpu[1-2] ") == "gpu10")
        #expect(throws: LaunchEnvironmentError.self) { try SlurmNodeList.firstHost("") }
        #expect(throws: LaunchEnvironmentError.self) { try SlurmNodeList.firstHost("node[]") }
        #expect(throws: LaunchEnvironmentError.self) { try SlurmNodeList.firstHost("node]1[") }
    }
}
