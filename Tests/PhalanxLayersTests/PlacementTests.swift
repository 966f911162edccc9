import PhalanxCUDA
import PhalanxLayers
import PhalanxRuntime
import Testing

/// Where tensors and parameters live: the CPU side of the one-model-two-backends contract (the GPU
/// side is `PhalanxCUDATests`, which runs the same layers on a device).
@Suite("Tensors and parameters know where they live")
struct PlacementTests {
    @Test("a host tensor is float32 on the CPU; write, array and compute agree; a view shares its root's storage")
    func hostTensor() {
        let t = Tensor([1, 2, 3, 4, 5, 6], shape: [2, 3])
        #expect(t.device.isSame(as: .cpu) && t.format == .float32)
        let view = Tensor(viewing: t, offset: 3, shape: [3])
        #expect(view.root === t && view.array == [4, 5, 6])
        view.write([7, 8, 9])
        #expect(t.array == [1, 2, 3, 7, 8, 9])
        #expect(t.compute === t, "no compute copy on the CPU: the products read the tensor itself")
        let viewOfView = Tensor(viewing: view, offset: 1, shape: [2])
        #expect(viewOfView.root === t && viewOfView.array == [8, 9])
    }

    @Test("a compute copy, when set, is what compute returns, for the root and (as a view) for its views")
    func computeCopy() {
        let t = Tensor([1, 2, 3, 4], shape: [2, 2])
        t.computeCopy = Tensor([10, 20, 30, 40], shape: [2, 2])
        #expect(t.compute.array == [10, 20, 30, 40])
        #expect(Tensor(viewing: t, offset: 2, shape: [2]).compute.array == [30, 40])
    }

    @Test("the CPU computes in float32 whatever format is asked for")
    func cpuPlacement() {
        #expect(Placement(.cpu, compute: .bfloat16).compute == .float32)
        #expect(Placement.cpu.device.isSame(as: .cpu) && "\(Placement.cpu)" == "cpu")
    }

    @Test("moving a layer to the CPU keeps every value and gradient, and views still alias their fused matrix")
    func moveToCPU() {
        var rng = SeededGenerator(seed: 1)
        let layer = PhalanxLayer("p", .init(dim: 32, kvHeads: 1), rng: &rng)
        let before = layer.parameters.map(\.value.array)
        layer.projA.gradient.fill(0.5)
        layer.move(to: .cpu)
        #expect(layer.parameters.map(\.value.array) == before)
        #expect(layer.projA.gradient.array.allSatisfy { $0 == 0.5 })
        layer.projA.value.write([Float](repeating: 2, count: layer.projA.value.count))
        #expect(layer.projA.value.root.array.contains(2), "the view writes into the fused matrix")
        #expect(layer.device.isSame(as: .cpu))
    }
}
