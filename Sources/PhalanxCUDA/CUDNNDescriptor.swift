/// One cuDNN backend descriptor (`cudnnBackendDescriptor_t`), destroyed with this object, with
/// typed setters for the attributes the attention graphs use. Values are cuDNN 9's
/// `cudnnBackendDescriptorType_t`, `cudnnBackendAttributeName_t` and `cudnnBackendAttributeType_t`.
final class CUDNNDescriptor {
    enum Kind: Int32 {
        case pointwise = 0, engineConfig = 3, engineHeuristics = 4, executionPlan = 5, pointwiseOperation = 13
        case operationGraph = 15, variantPack = 16, tensor = 17, matmul = 18, matmulOperation = 19, reduction = 21
        case reductionOperation = 22, reshapeOperation = 31
    }

    enum Attribute: Int32 {
        case pointwiseMode = 0, pointwiseMathPrecision = 1, pointwiseAxis = 9
        case engineHeuristicsMode = 200, engineHeuristicsOperationGraph = 201, engineHeuristicsResults = 202
        case executionPlanHandle = 400, executionPlanEngineConfig = 401, executionPlanWorkspaceSize = 402
        case pointwisePWDescriptor = 750, pointwiseX = 751, pointwiseB = 752, pointwiseY = 753, pointwiseT = 758
        case operationGraphHandle = 800, operationGraphOps = 801
        case tensorByteAlignment = 900, tensorDataType = 901, tensorDimensions = 902, tensorStrides = 903
        case tensorUniqueID = 906, tensorIsVirtual = 907, tensorIsByValue = 908
        case variantPackUniqueIDs = 1000, variantPackDataPointers = 1001, variantPackWorkspace = 1003
        case matmulComputeType = 1500
        case matmulA = 1520, matmulB = 1521, matmulC = 1522, matmulDescriptor = 1523
        case reductionOperator = 1600, reductionComputeType = 1601
        case reductionX = 1610, reductionY = 1611, reductionDescriptor = 1612
        case reshapeX = 2200, reshapeY = 2201
    }

    /// `cudnnBackendAttributeType_t` values used here.
    enum ValueType: Int32 {
        case handle = 0, dataType = 1, boolean = 2, int64 = 3, voidPointer = 6, heuristicsMode = 8, pointwiseMode = 14
        case descriptor = 15, reductionOperator = 18
    }

    let library: CUDNNLibrary
    let pointer: OpaquePointer
    /// What the descriptor is for, in error messages.
    let label: String

    init(_ library: CUDNNLibrary, type: Kind, label: String) throws {
        var pointer: OpaquePointer?
        try library.check(library.createDescriptor(type.rawValue, &pointer), "cudnnBackendCreateDescriptor(\(type)) for \(label)")
        guard let pointer else { throw CUDAUnavailable("cudnnBackendCreateDescriptor(\(type)) returned nothing") }
        (self.library, self.pointer, self.label) = (library, pointer, label)
    }

    deinit { _ = library.destroyDescriptor(pointer) }

    func set(_ name: Attribute, type: Int32, count: Int, _ values: UnsafeRawPointer?) throws {
        try library.check(library.setAttribute(pointer, name.rawValue, type, Int64(count), values), "set \(name) of \(label)")
    }

    func set(_ name: Attribute, int64s values: [Int64]) throws {
        try values.withUnsafeBufferPointer { try set(name, type: ValueType.int64.rawValue, count: $0.count, $0.baseAddress) }
    }

    func set(_ name: Attribute, int32 value: Int32, as type: ValueType) throws {
        var value = value
        try set(name, type: type.rawValue, count: 1, &value)
    }

    func set(_ name: Attribute, dataType: CUDNNGraph.DataType) throws {
        try set(name, int32: dataType.rawValue, as: .dataType)
    }

    func set(_ name: Attribute, bool value: Bool) throws {
        var value = value
        try set(name, type: ValueType.boolean.rawValue, count: 1, &value)
    }

    func set(_ name: Attribute, handle: OpaquePointer) throws {
        var handle: OpaquePointer? = handle
        try set(name, type: ValueType.handle.rawValue, count: 1, &handle)
    }

    func set(_ name: Attribute, descriptor: CUDNNDescriptor) throws {
        try set(name, descriptors: [descriptor])
    }

    func set(_ name: Attribute, descriptors: [CUDNNDescriptor]) throws {
        let pointers: [OpaquePointer?] = descriptors.map(\.pointer)
        try pointers.withUnsafeBufferPointer { try set(name, type: ValueType.descriptor.rawValue, count: $0.count, $0.baseAddress) }
    }

    func finalize() throws {
        try library.check(library.finalize(pointer), "finalize \(label)")
    }

    /// A finalized descriptor's one int64 attribute.
    func int64(_ name: Attribute) throws -> Int64 {
        var value: Int64 = 0, count: Int64 = 0
        try library.check(library.getAttribute(pointer, name.rawValue, ValueType.int64.rawValue, 1, &count, &value),
                          "get \(name) of \(label)")
        return value
    }

    /// A finalized heuristics descriptor's engine configurations, best first.
    func engineConfigs() throws -> [CUDNNDescriptor] {
        var count: Int64 = 0
        try library.check(library.getAttribute(pointer, Attribute.engineHeuristicsResults.rawValue, ValueType.descriptor.rawValue,
                                               0, &count, nil), "count the engine configurations of \(label)")
        guard count > 0 else { return [] }
        let configs = try (0..<Int(count)).map { _ in try CUDNNDescriptor(library, type: .engineConfig, label: "engine configuration") }
        var pointers: [OpaquePointer?] = configs.map(\.pointer)
        var returned: Int64 = 0
        try library.check(library.getAttribute(pointer, Attribute.engineHeuristicsResults.rawValue, ValueType.descriptor.rawValue,
                                               count, &returned, &pointers), "get the engine configurations of \(label)")
        return Array(configs.prefix(Int(returned)))
    }
}
