/** ddk2docker as a library: the same pipeline the CLI runs, and the format readers it is built from. */
export { convertDdk, defaultCacheDir, LABELS, type ConvertOptions, type ConvertResult } from './pipeline/pipeline.js';
export { inspectSource, type InspectOptions, type InspectResult } from './pipeline/inspect.js';
export { verifyImage, describeVerification, type VerifyImageOptions, type VerifyImageResult } from './pipeline/verify-image.js';
export { listCatalogue, catalogueTable, recordConversion, forgetVm, catalogueFile, type CatalogueEntry, type ListedEntry } from './catalogue.js';
export { doctor, type DoctorReport } from './doctor.js';
export { CancelledError, EnvironmentError, InputError } from './errors.js';
export { FileSource, SliceSource, type Source } from './formats/source.js';
export { Iso9660 } from './formats/iso9660.js';
export { parseOvaXml, chunkLayout, CHUNK_SIZE } from './formats/xva.js';
export { detectVhd, openVhd, vhdInfo } from './formats/vhd.js';
export { readPartitionTable, partitionSource, chooseRootPartition } from './formats/partitions.js';
export { ExtFileSystem } from './formats/ext/index.js';
export { packTree, readTar } from './formats/tar.js';
export { manifestFromTar, compareManifests, diffManifests, type Difference, type Manifest } from './manifest.js';
export { parseOutput, writeOutput, type Output } from './docker/outputs.js';
export { register, deregister, listContainers, containerAction, waitMonitoring } from './xapi/index.js';
